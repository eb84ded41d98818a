"""Test-wide settings and fixtures.

* Triton kernels run on CPU tensors through the interpreter when no GPU is present; the variable must be set
  before triton is first imported, hence here.
* ``spawnable``: worker processes started with torch.multiprocessing.spawn unpickle their target by the test
  module's dotted name (``tests.kernels.test_x``) and take the parent's ``sys.path``; the context manager puts
  the checkout on ``sys.path`` just while the workers start, so the test process itself never sees the
  checkout's folders as top-level packages.
"""

import contextlib
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@contextlib.contextmanager
def _checkout_on_path():
    sys.path.insert(0, str(REPO_ROOT))
    try:
        yield
    finally:
        sys.path.remove(str(REPO_ROOT))


@pytest.fixture(scope="session")
def spawnable():
    """``with spawnable(): torch.multiprocessing.spawn(worker, ...)`` for workers defined in test modules."""
    return _checkout_on_path
