"""systemd-journald through its native protocol: one datagram per record, our fields
as journal fields (``journalctl FSWATCHAUDIT_KEY=passwd``).

Every field is sent in the binary-safe form (name, newline, 64-bit little-endian
length, the bytes, newline), so names with newlines or raw bytes arrive exactly.
"""
from __future__ import annotations

import socket
import struct
from typing import Any

from ..events import Event, Marker, Record
from .encode import escape, format_record, marker_fields

DEFAULT_SOCKET = "/run/systemd/journal/socket"
PRIORITY_NOTICE, PRIORITY_INFO = b"5", b"6"
FIELDS = ("seq", "op", "path", "path2", "result", "syscall", "pid", "tid", "ppid", "uid",
          "euid", "gid", "loginuid", "comm", "exe", "dev", "ino", "parent_ino", "parent2_ino",
          "backend", "access")


def _field(name: str, value: bytes) -> bytes:
    return name.encode() + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"


def _bytes(value: Any) -> bytes:
    return str(value).encode("utf-8", "surrogateescape")


def format_entry(record: Record) -> bytes:
    parts = [_field("MESSAGE", escape(format_record(record)).encode()),
             _field("SYSLOG_IDENTIFIER", b"fswatchaudit"),
             _field("FSWATCHAUDIT_RECORD", record.kind.encode())]
    if isinstance(record, Event):
        parts.append(_field("PRIORITY", PRIORITY_NOTICE))
        for name in FIELDS:
            value = getattr(record, name)
            if value is not None:
                parts.append(_field(f"FSWATCHAUDIT_{name.upper()}", _bytes(value)))
        for key in record.keys:                   # a field may repeat in the journal
            parts.append(_field("FSWATCHAUDIT_KEY", _bytes(key)))
    else:
        parts.append(_field("PRIORITY", PRIORITY_INFO))
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
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.settimeout(10)
        try:
            self.sock.sendto(format_entry(record), self.path)
        except OSError:
            self.close()
            raise
        self.sent += 1

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def stats(self) -> dict[str, Any]:
        return {"sent": self.sent}
