"""The chain heads a host's log writer sent to its remote sinks, read back from where
they arrived, for `log verify --heads FILE` and `--nats URL`: a tail cut off the log on
the host is seen against them (integrity.check_heads).

A head is a ``mark`` record with ``what = head`` and ``host``, ``part``, ``seq``, ``h``.
A heads file may hold, one per line, our JSON maps (a jsonl export, `search --json`),
journal entries (`journalctl -o json`: FSWATCHAUDIT_WHAT=head ...), or syslog lines
with our structured data (``[fswatchaudit@32473 what="head" ...]``, as received, or
as rsyslog's mmpstrucdata JSON); other lines are skipped.
"""
from __future__ import annotations

import json
import re
from typing import Any

from .syslog import SD_ID

_SD = re.compile(r"\[" + re.escape(SD_ID) + r"((?:\s+\w+=\"(?:[^\"\\\]]|\\.)*\")*)\s*\]")
_PARAM = re.compile(r"(\w+)=\"((?:[^\"\\\]]|\\.)*)\"")
_SD_UNESCAPE = re.compile(r"\\([\"\\\]])")


def _head(fields: dict[str, Any]) -> dict[str, Any] | None:
    """A head's fields, typed; None when these are not a head's."""
    if fields.get("what") != "head":
        return None
    try:
        return {"host": str(fields["host"]), "part": str(fields["part"]),
                "seq": int(fields["seq"]), "h": str(fields["h"])}
    except (KeyError, ValueError, TypeError):
        return None


def parse_line(line: str) -> dict[str, Any] | None:
    """The head a line holds, in any of the forms the module names; else None."""
    line = line.strip()
    brace = line.find("{")          # a JSON object, alone or after a receiver's prefix
    if brace >= 0:
        try:
            data = json.loads(line[brace:])
        except ValueError:
            data = None
        if isinstance(data, dict):
            if data.get("t") == "mark":
                return _head(data)
            if "FSWATCHAUDIT_WHAT" in data:            # journalctl -o json
                return _head({k[len("FSWATCHAUDIT_"):].lower(): v for k, v in data.items()
                              if k.startswith("FSWATCHAUDIT_")})
            if isinstance(data.get(SD_ID), dict):      # rsyslog's parsed SD
                return _head(data[SD_ID])
    match = _SD.search(line)
    if match:
        return _head({k: _SD_UNESCAPE.sub(r"\1", v)
                      for k, v in _PARAM.findall(match.group(1))})
    return None


def read_heads_file(path: str) -> list[dict[str, Any]]:
    """Every head in a file, in its order (OSError when it cannot be read)."""
    out = []
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            head = parse_line(line)
            if head is not None:
                out.append(head)
    return out


def nats_heads(servers: str, hosts: list[str], **options: Any) -> list[dict[str, Any]]:
    """Every head the hosts published to the stream, in stream order."""
    from .nats_reader import iter_stream
    out = []
    for host in hosts:
        for item in iter_stream(servers.split(","), host, no_key=True, **options):
            head = _head(item.record) if item.record.get("t") == "mark" else None
            if head is not None:
                out.append(head)
    return out


__all__ = ["nats_heads", "parse_line", "read_heads_file"]
