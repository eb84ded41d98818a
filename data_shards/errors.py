"""Errors of the data stage. Messages always name the file and, where known, the row / resource and field."""

from ehrfm.errors import EhrfmError


class DataError(EhrfmError, ValueError):
    """Input data that cannot be used as given (missing/mistyped columns, unparseable values, ...)."""
