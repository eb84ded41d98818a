"""Test-wide settings. Triton kernels run on CPU tensors through the interpreter when no GPU is present;
the variable must be set before triton is first imported, hence here."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
