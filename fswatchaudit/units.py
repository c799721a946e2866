"""Sizes as people write them in configuration ("8M", "512KiB", "5%"), in one grammar."""
from __future__ import annotations

import re

_SIZE = re.compile(r"^(\d+)\s*([KMG]?)(?:i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str | int) -> int:
    """Bytes from 4096, '4096', '512K', '8M', '1G', '8MiB' (binary units)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r}: expected a number with an optional "
                         "K, M or G suffix")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def threshold_bytes(threshold: str | int, total: int) -> int:
    """A threshold written as bytes or as a percentage ("5%") of ``total`` bytes."""
    if isinstance(threshold, str) and threshold.endswith("%"):
        return int(total * float(threshold[:-1]) / 100)
    return parse_size(threshold)
