"""eBPF backend: bcc programs on kernel tracepoints (see backend.py)."""
from .backend import EbpfBackend

__all__ = ["EbpfBackend"]
