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
import os
import re
import time
from typing import Any, Protocol

import msgpack

from ..events import Event, LostCounts, Marker, ProcessState, Record, RulesInForce
from ..names import errno_name, uid_text


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


# json.dumps with arguments builds an encoder for every call: one, made once
_json_line = json.JSONEncoder(separators=(",", ":")).encode


class JsonEncoder:
    """One JSON object per line."""

    def encode(self, record: Record) -> bytes:
        return (_json_line(record.to_dict()) + "\n").encode()

    def encode_map(self, data: dict[str, Any]) -> bytes:
        return (_json_line(data) + "\n").encode()


# Column widths of human lines: the widest alias set ("fs-create,fs-remove") and the
# longest operation name ("removexattr") fit, so columns stay put line after line.
ALIAS_WIDTH = 19
OP_WIDTH = 11
TIME_WIDTH = 29             # 2026-12-03T09:03:45.123+00:00

# SGR colours for terminals (only when asked: see ``color_wanted``)
_SGR = {"time": "2", "alias": "36", "create": "32", "remove": "31", "attr": "33",
        "open": "34", "exec": "35", "fail": "1;31", "key": "35", "note": "2"}
_OP_STYLE = {"fs-create": "create", "fs-remove": "remove", "fs-attr": "attr",
             "open": "open", "exec": "exec"}


def color_wanted(choice: str = "auto", stream: Any = None) -> bool:
    """``--color``: always, never, or auto (a terminal, NO_COLOR unset, TERM not dumb)."""
    if choice == "always":
        return True
    if choice == "never" or os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):
        return False


def _paint(text: str, style: str | None, color: bool) -> str:
    if not color or style is None:
        return text
    return f"\x1b[{_SGR[style]}m{text}\x1b[0m"


_second_cache: dict[int, str] = {}


def iso_time(ns: int) -> str:
    """ISO 8601 local time with milliseconds and the UTC offset; ``-`` when unknown."""
    if not ns:
        return "-"
    sec, rest = divmod(ns, 1_000_000_000)
    prefix = _second_cache.get(sec)
    if prefix is None:
        lt = time.localtime(sec)
        off = lt.tm_gmtoff or 0
        sign = "+" if off >= 0 else "-"
        off = abs(off)
        prefix = (time.strftime("%Y-%m-%dT%H:%M:%S", lt).replace("%", "%%") + ".%03d"
                  + f"{sign}{off // 3600:02d}:{off % 3600 // 60:02d}")
        if len(_second_cache) > 4096:
            _second_cache.clear()
        _second_cache[sec] = prefix
    return prefix % (rest // 1_000_000)


def result_text(result: int) -> str:
    """``EACCES`` for -13 (the errno name), ``0`` for success."""
    return errno_name(result)


def format_event(ev: Event, color: bool = False) -> str:
    """One readable line, every name escaped (``escape``): time, aliases, operation,
    path(s), result, who, keys."""
    alias = ",".join(ev.aliases) or "-"
    style = next((_OP_STYLE[a] for a in ev.aliases if a in _OP_STYLE), None)
    what = field_text(ev.path) if ev.path is not None else "?"
    if ev.path2 is not None:
        what = f"{what} -> {field_text(ev.path2)}"
    parts = [_paint(f"{iso_time(ev.time):<{TIME_WIDTH}}", "time", color),
             _paint(f"{escape(alias):<{ALIAS_WIDTH}}", "alias", color),
             _paint(f"{escape(ev.op):<{OP_WIDTH}}", style, color), what]
    if ev.op == "open" and ev.access:
        parts.append(f"access={escape(ev.access)}")
    if ev.result not in (None, 0):
        parts.append(_paint(f"result={result_text(ev.result)}", "fail", color))
    for name in ("pid", "ppid"):
        value = getattr(ev, name)
        if value is not None:
            parts.append(f"{name}={value}")
    for name in ("uid", "loginuid"):
        value = getattr(ev, name)
        if value is not None:
            parts.append(f"{name}={escape(uid_text(value))}")
    if ev.euid is not None and ev.euid != ev.uid:
        parts.append(f"euid={escape(uid_text(ev.euid))}")
    for name in ("comm", "exe"):
        value = getattr(ev, name)
        if value is not None:
            parts.append(f"{name}={field_text(value)}")
    if ev.syscall:
        parts.append(f"syscall={escape(ev.syscall)}")
    if ev.container:
        parts.append(f"container={field_text(str(ev.container.get('id', '?')))}")
    if ev.keys:
        parts.append(_paint("key=" + field_text(",".join(ev.keys)), "key", color))
    return " ".join(parts)


def format_state(st: ProcessState, color: bool = False) -> str:
    parts = [_paint(f"{'-':<{TIME_WIDTH}}", "time", color),
             _paint(f"{'process':<{ALIAS_WIDTH}}", "alias", color),
             f"{escape(st.reason):<{OP_WIDTH}}", f"pid={st.pid}"]
    if st.ppid is not None:
        parts.append(f"ppid={st.ppid}")
    for name in ("uid", "loginuid"):
        value = getattr(st, name)
        if value is not None:
            parts.append(f"{name}={escape(uid_text(value))}")
    for name in ("comm", "exe", "cwd"):
        value = getattr(st, name)
        if value is not None:
            parts.append(f"{name}={field_text(value)}")
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


def field_text(text: str) -> str:
    """``escape``d, and in double quotes (an inner quote as \\") when it holds a space or
    a quote: one field of a human line, so that a name such as ``x result=EPERM uid=0``
    cannot pass for fields of its own."""
    out = escape(text)
    if out and " " not in out and '"' not in out:
        return out
    return '"' + out.replace('"', '\\"') + '"'


def format_record(record: Record, color: bool = False) -> str:
    """A human line for any record, already escaped."""
    if isinstance(record, Event):
        return format_event(record, color)
    if isinstance(record, ProcessState):
        return format_state(record, color)
    if isinstance(record, LostCounts):
        text = f"# lost: {record.counts}"
    elif isinstance(record, RulesInForce):
        text = f"# rules ({record.reason}): {len(record.rules)} rules, digest {record.digest}"
    elif isinstance(record, Marker):
        text = f"# {record.what}: {record.detail}"
    else:
        raise TypeError(f"not a record: {record!r}")
    return _paint(escape(text), "note", color)


_PLAIN_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


def marker_fields(record: Marker) -> list[tuple[str, Any]]:
    """A marker's details that are plain values, under names fit for structured data
    and journal fields (letters, digits, underscore)."""
    return [(name, value) for name, value in record.detail.items()
            if isinstance(value, (str, int, float)) and _PLAIN_NAME.fullmatch(name)]


def format_map(data: dict[str, Any]) -> str:
    """A line for a file's own maps (header, drop note) or an unknown kind."""
    if data.get("t") == "hdr":
        start = data.get("start")
        when = iso_time(start) if isinstance(start, int) and start > 0 else start
        return (f"# log: host={data.get('host')} backend={data.get('backend')} "
                f"start={when} rules={data.get('rules_digest')}")
    return f"# {data.get('t')}: {data}"


class HumanEncoder:
    """One line per record for a terminal: every name in it escaped (``escape``);
    SGR colours only with ``color`` (see ``color_wanted``)."""

    def __init__(self, color: bool = False) -> None:
        self.color = color

    def encode(self, record: Record) -> bytes:
        return (format_record(record, self.color) + "\n").encode()

    def encode_map(self, data: dict[str, Any]) -> bytes:
        return (_paint(escape(format_map(data)), "note", self.color) + "\n").encode()


ENCODERS: dict[str, type[Encoder]] = {"msgpack": MsgpackEncoder, "json": JsonEncoder,
                                      "human": HumanEncoder}
