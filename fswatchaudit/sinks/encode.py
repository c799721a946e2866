"""Encoders: a record (or a file's own map, such as its header) -> bytes.

One serialised form for every record kind (``Record.to_dict``, first key ``"t"``);
the encoders differ only in how that map becomes bytes: msgpack for logs, one JSON
object per line, or a line for people.
"""
from __future__ import annotations

import json
from typing import Any, Protocol

import msgpack

from ..events import Event, LostCounts, Marker, ProcessState, Record, RulesInForce


class Encoder(Protocol):
    def encode(self, record: Record) -> bytes: ...

    def encode_map(self, data: dict[str, Any]) -> bytes: ...


class MsgpackEncoder:
    """One msgpack map per record (the log format)."""

    def __init__(self) -> None:
        self._packer = msgpack.Packer()

    def encode(self, record: Record) -> bytes:
        return self._packer.pack(record.to_dict())

    def encode_map(self, data: dict[str, Any]) -> bytes:
        return self._packer.pack(data)


class JsonEncoder:
    """One JSON object per line."""

    def encode(self, record: Record) -> bytes:
        return self.encode_map(record.to_dict())

    def encode_map(self, data: dict[str, Any]) -> bytes:
        return (json.dumps(data, separators=(",", ":")) + "\n").encode()


def format_event(ev: Event) -> str:
    """One readable line: alias column, operation, path(s), who."""
    alias = ",".join(ev.aliases) or "-"
    what = ev.path or "?"
    if ev.path2 is not None:
        what = f"{what} -> {ev.path2}"
    parts = [f"{alias:<18}", f"{ev.op:<11}", what]
    if ev.op == "open" and ev.access:
        parts.append(f"access={ev.access}")
    if ev.result not in (None, 0):
        parts.append(f"result={ev.result}")
    for name in ("pid", "ppid", "uid", "comm", "exe"):
        value = getattr(ev, name)
        if value is not None:
            parts.append(f"{name}={value}")
    if ev.syscall:
        parts.append(f"syscall={ev.syscall}")
    if ev.container:
        parts.append(f"container={ev.container.get('id', '?')}")
    if ev.keys:
        parts.append("key=" + ",".join(ev.keys))
    return " ".join(parts)


def format_state(st: ProcessState) -> str:
    parts = [f"{'process':<18}", f"{st.reason:<11}", f"pid={st.pid}"]
    for name in ("ppid", "uid", "comm", "exe", "cwd"):
        value = getattr(st, name)
        if value is not None:
            parts.append(f"{name}={value}")
    return " ".join(parts)


def format_record(record: Record) -> str:
    if isinstance(record, Event):
        return format_event(record)
    if isinstance(record, ProcessState):
        return format_state(record)
    if isinstance(record, LostCounts):
        return f"# lost: {record.counts}"
    if isinstance(record, RulesInForce):
        return f"# rules ({record.reason}): {len(record.rules)} rules, digest {record.digest}"
    if isinstance(record, Marker):
        return f"# {record.what}: {record.detail}"
    raise TypeError(f"not a record: {record!r}")


def format_map(data: dict[str, Any]) -> str:
    """A line for a file's own maps (header, drop note) or an unknown kind."""
    if data.get("t") == "hdr":
        return (f"# log: host={data.get('host')} backend={data.get('backend')} "
                f"start={data.get('start')} rules={data.get('rules_digest')}")
    return f"# {data.get('t')}: {data}"


class HumanEncoder:
    """One line per record for a terminal."""

    def encode(self, record: Record) -> bytes:
        return (format_record(record) + "\n").encode(errors="surrogateescape")

    def encode_map(self, data: dict[str, Any]) -> bytes:
        return (format_map(data) + "\n").encode(errors="surrogateescape")


ENCODERS: dict[str, type[Encoder]] = {"msgpack": MsgpackEncoder, "json": JsonEncoder,
                                      "human": HumanEncoder}
