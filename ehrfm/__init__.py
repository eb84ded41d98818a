"""ehrfm: foundation models for electronic health records."""
__version__ = "0.1.0"
