"""Mamba v1 selective scan: ``selective_scan`` (fast, explicit backward, document resets; mamba_ssm on CUDA)
beside ``selective_scan_reference`` (the plain sequential oracle)."""

from .reference import selective_scan_reference
from .scan import fp32_region, selective_scan

__all__ = ["fp32_region", "selective_scan", "selective_scan_reference"]
