r"""Encoders: a record (or a file's own map, such as its header) -> bytes.

One serialised form for every record kind (``Record.to_dict``, first key ``"t"``);
the encoders differ only in how that map becomes bytes: msgpack for logs, one JSON
object per line, or a line for people.

Names are bytes.  In memory a name that is not UTF-8 is a str holding its raw bytes
as lone surrogates (Python's "surrogateescape", as os.fsdecode gives); every encoder
keeps those bytes:
  msgpack  such a string is stored as a bin (bytes) value; the reader turns it back
  JSON     the raw bytes appear as the escapes \udc80-\udcff; decoding the JSON and
           encoding the string with "surrogateescape" gives back the exact bytes
  human    every control, non-printable or non-UTF-8 character is escaped (see
           ``escape``), so no name can forge a line or reach the terminal raw
"""
from __future__ import annotations

import json
from typing import Any, Protocol

import msgpack

from ..events import Event, LostCounts, Marker, ProcessState, Record, RulesInForce


class Encoder(Protocol):
    def encode(self, record: Record) -> bytes: ...

    def encode_map(self, data: dict[str, Any]) -> bytes: ...


def _as_bytes(value: Any) -> Any:
    """Strings that hold raw bytes (surrogates) as bytes, inside lists and maps too."""
    if isinstance(value, str):
        try:
            value.encode()
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape")
    if isinstance(value, dict):
        return {k: _as_bytes(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_bytes(v) for v in value]
    return value


def as_text(value: Any) -> Any:
    """The inverse of the msgpack encoding: bin values back to (surrogateescape) str."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, dict):
        return {as_text(k): as_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_text(v) for v in value]
    return value


class MsgpackEncoder:
    """One msgpack map per record (the log format)."""

    def __init__(self) -> None:
        self._packer = msgpack.Packer()

    def encode(self, record: Record) -> bytes:
        return self.encode_map(record.to_dict())

    def encode_map(self, data: dict[str, Any]) -> bytes:
        try:
            return self._packer.pack(data)
        except UnicodeEncodeError:      # a name that is not UTF-8: stored as bytes
            return self._packer.pack(_as_bytes(data))


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


_NAMED_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    r"""C-style escapes for what a terminal line must not carry raw: backslash, newline,
    CR, tab as \\ \n \r \t; a byte that is not UTF-8 as \xHH; any other control or
    non-printable character as \xHH, \uHHHH or \UHHHHHHHH.  Printable text stays
    as it is, so ordinary names read as themselves."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            if 0xDC80 <= code <= 0xDCFF:            # a raw byte (surrogateescape)
                out.append(f"\\x{code - 0xDC00:02x}")
            elif code < 0x100:
                out.append(f"\\x{code:02x}")
            elif code < 0x10000:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
    return "".join(out)


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
    """One line per record for a terminal: everything in it escaped (``escape``)."""

    def encode(self, record: Record) -> bytes:
        return (escape(format_record(record)) + "\n").encode()

    def encode_map(self, data: dict[str, Any]) -> bytes:
        return (escape(format_map(data)) + "\n").encode()


ENCODERS: dict[str, type[Encoder]] = {"msgpack": MsgpackEncoder, "json": JsonEncoder,
                                      "human": HumanEncoder}
