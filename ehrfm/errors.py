"""The base class of every *expected* ehrfm error.

An expected error is one a user can fix from its message alone: bad input data, a config value out of range,
an output folder that is someone else's, a checkpoint that fails its integrity check, training that
diverged. Each subclass names the file / row / field at fault. The `ehrfm` command prints such errors as one
line ``error: <message>`` and exits with :data:`EXPECTED_ERROR_EXIT_CODE`; the traceback is shown only with
``--log-level DEBUG``. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXPECTED_ERROR_EXIT_CODE = 2


class EhrfmError(Exception):
    """An error whose message tells the user what to fix (see the module docstring)."""
