"""systemd-journald through its native protocol: one datagram per record, our fields
as journal fields (``journalctl FSWATCHAUDIT_KEY=passwd``).

Every field is sent in the binary-safe form (name, newline, 64-bit little-endian
length, the bytes, newline), so names with newlines or raw bytes arrive exactly.
"""
from __future__ import annotations

import operator
import socket
import struct
from typing import Any

from ..events import Event, Marker, Record
from .encode import escape, format_record, marker_fields
from .queued import PartlySent

DEFAULT_SOCKET = "/run/systemd/journal/socket"
PRIORITY_NOTICE, PRIORITY_INFO = b"5", b"6"
FIELDS = ("seq", "op", "path", "path2", "result", "syscall", "pid", "tid", "ppid", "uid",
          "euid", "gid", "loginuid", "comm", "exe", "dev", "ino", "parent_ino", "parent2_ino",
          "backend", "access")


def _field(name: str, value: bytes) -> bytes:
    return name.encode() + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"


def _bytes(value: Any) -> bytes:
    return str(value).encode("utf-8", "surrogateescape")


_event_values = operator.attrgetter(*FIELDS)
# each event field's name and newline, ready to be followed by the value's length
_HEADS = tuple(f"FSWATCHAUDIT_{name.upper()}\n".encode() for name in FIELDS)
_KEY_HEAD = b"FSWATCHAUDIT_KEY\n"
_SIZE = struct.Struct("<Q").pack
_IDENT = _field("SYSLOG_IDENTIFIER", b"fswatchaudit")
_EVENT_FIXED = _field("FSWATCHAUDIT_RECORD", b"ev") + _field("PRIORITY", PRIORITY_NOTICE)


def format_entry(record: Record) -> bytes:
    message = escape(format_record(record)).encode()
    if type(record) is Event:
        parts = [b"MESSAGE\n", _SIZE(len(message)), message, b"\n", _IDENT, _EVENT_FIXED]
        for head, value in zip(_HEADS, _event_values(record), strict=True):
            if value is not None:
                data = str(value).encode() if type(value) is int else _bytes(value)
                parts += (head, _SIZE(len(data)), data, b"\n")
        for key in record.keys:                   # a field may repeat in the journal
            data = _bytes(key)
            parts += (_KEY_HEAD, _SIZE(len(data)), data, b"\n")
        return b"".join(parts)
    parts = [_field("MESSAGE", message), _IDENT,
             _field("FSWATCHAUDIT_RECORD", record.kind.encode()),
             _field("PRIORITY", PRIORITY_INFO)]
    if isinstance(record, Marker):
        parts.append(_field("FSWATCHAUDIT_WHAT", _bytes(record.what)))
        parts += [_field(f"FSWATCHAUDIT_{name.upper()}", _bytes(value))
                  for name, value in marker_fields(record)]
    return b"".join(parts)


class JournaldSink:
    """A transport for QueuedSink: raises when journald cannot take an entry."""

    def __init__(self, path: str = DEFAULT_SOCKET, name: str = "journald") -> None:
        self.name = name
        self.path = path
        self.sock: socket.socket | None = None
        self.sent = 0

    def write(self, record: Record) -> None:
        self.write_many([record])

    def write_many(self, records: list[Record]) -> None:
        """A datagram each, in order, on one connected socket (the protocol has one
        entry a datagram); PartlySent when only the first few went."""
        entries = [format_entry(r) for r in records]
        done = 0
        try:
            if self.sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                try:
                    sock.settimeout(10)
                    sock.connect(self.path)
                except OSError:
                    sock.close()
                    raise
                self.sock = sock
            send = self.sock.send
            for entry in entries:
                send(entry)
                done += 1
        except OSError as exc:
            self.close()
            self.sent += done
            if done:
                raise PartlySent(done, exc) from exc
            raise
        self.sent += done

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def stats(self) -> dict[str, Any]:
        return {"sent": self.sent}
