"""Times on the command line: ISO 8601 (python-dateutil's isoparse), ``now``,
``today``, ``yesterday`` (local midnight), and relative forms ``-30s``, ``-10m``,
``-2h``, ``-3d``, ``-1w`` (that long before now)."""
from __future__ import annotations

import datetime as dt
import re
import time

from dateutil.parser import isoparse

_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
NS = 1_000_000_000
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _local_midnight(now_s: float, days_back: int) -> int:
    today = dt.datetime.fromtimestamp(now_s).date() - dt.timedelta(days=days_back)
    midnight = dt.datetime.combine(today, dt.time()).astimezone()
    return int(midnight.timestamp()) * NS


def parse_when(text: str, now_ns: int | None = None) -> int:
    """ns since the epoch for a time given on the command line; ValueError with a
    message saying which forms are accepted."""
    now = time.time_ns() if now_ns is None else now_ns
    t = text.strip()
    low = t.lower()
    if low == "now":
        return now
    if low == "today":
        return _local_midnight(now / NS, 0)
    if low == "yesterday":
        return _local_midnight(now / NS, 1)
    m = _RELATIVE.match(low)
    if m:
        return now - int(float(m.group(1)) * _UNIT[m.group(2)] * NS)
    try:
        when = isoparse(t)
    except (ValueError, OverflowError):
        raise ValueError(f"not a time: {text!r} (give ISO 8601 such as 2026-12-03T09:00 "
                         "or 2026-12-03, now, today, yesterday, or -30s, -10m, -2h, "
                         "-3d, -1w)") from None
    if when.tzinfo is None:          # a time without an offset is local time
        when = when.astimezone()
    return (when - _EPOCH) // dt.timedelta(microseconds=1) * 1000
