"""The Mamba scans, each fast path beside its sequential reference (the test oracle):

* Mamba v1 selective scan: ``selective_scan`` (explicit backward, document resets; mamba_ssm's CUDA kernel when
  installed) beside ``selective_scan_reference``;
* Mamba2 SSD scan: ``ssd_chunk_scan`` (chunked, document resets; mamba_ssm's Triton scan on CUDA when
  installed, ``ssd_chunk_scan_torch`` otherwise) beside ``ssd_scan_reference``.
"""

from .reference import selective_scan_reference
from .scan import fp32_region, selective_scan
from .ssd import ssd_chunk_scan, ssd_chunk_scan_torch
from .ssd_reference import ssd_scan_reference

__all__ = [
    "fp32_region",
    "selective_scan",
    "selective_scan_reference",
    "ssd_chunk_scan",
    "ssd_chunk_scan_torch",
    "ssd_scan_reference",
]
