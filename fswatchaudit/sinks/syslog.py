"""Syslog (RFC 5424) with the event's fields as structured data, to the local socket,
over UDP, or over TCP with octet-counted framing (RFC 6587).

    <PRI>1 TIMESTAMP HOST fswatchaudit PID KIND [fswatchaudit@32473 op="..." ...] LINE

The structured data carries the fields a collector filters on; the message is the
human line.  Values go through the human escaping (no control character, no raw byte)
and then RFC 5424's own escaping of `"`, `\\` and `]`.
"""
from __future__ import annotations

import itertools
import operator
import os
import re
import socket
import time
from typing import Any
from urllib.parse import urlsplit

from ..events import Event, Marker, Record
from .encode import escape, format_record, marker_fields
from .queued import PartlySent

SD_ID = "fswatchaudit@32473"      # 32473: the enterprise number RFC 5612 sets aside
FACILITIES = {"kern": 0, "user": 1, "daemon": 3, "auth": 4, "syslog": 5, "authpriv": 10,
              **{f"local{n}": 16 + n for n in range(8)}}
SEVERITY_NOTICE, SEVERITY_INFO = 5, 6
SD_FIELDS = ("seq", "op", "path", "path2", "result", "syscall", "pid", "ppid", "uid",
             "euid", "gid", "loginuid", "comm", "exe", "dev", "ino", "parent_ino", "parent2_ino",
             "backend")


_SD_SPECIAL = re.compile(r'[\\"\]]')


def _sd_value(value: Any) -> str:
    if type(value) is int:
        return str(value)
    text = escape(str(value))
    if _SD_SPECIAL.search(text) is None:
        return text
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


_stamp_cache: dict[int, str] = {}


def _rfc3339(ns: int) -> str:
    seconds, rest = divmod(ns, 10**9)
    stamp = _stamp_cache.get(seconds)
    if stamp is None:
        if len(_stamp_cache) > 4096:
            _stamp_cache.clear()
        stamp = _stamp_cache[seconds] = time.strftime("%Y-%m-%dT%H:%M:%S",
                                                      time.gmtime(seconds))
    return f"{stamp}.{rest // 1000:06d}Z"


_sd_values = operator.attrgetter(*SD_FIELDS)


def format_5424(record: Record, facility: int, host: str, app: str = "fswatchaudit",
                pid: int | None = None) -> bytes:
    params: list[str] = []
    when = getattr(record, "time", 0) or time.time_ns()
    severity = SEVERITY_INFO
    if type(record) is Event:
        severity = SEVERITY_NOTICE
        params = [f'{name}="{_sd_value(value)}"'
                  for name, value in zip(SD_FIELDS, _sd_values(record), strict=True)
                  if value is not None]
        for key in record.keys:
            params.append(f'key="{_sd_value(key)}"')
    elif isinstance(record, Marker):
        # what happened to the audit, with its plain details (a chain head's part,
        # seq and h: what `log verify --heads` reads back)
        params.append(f'what="{_sd_value(record.what)}"')
        params += [f'{name}="{_sd_value(value)}"' for name, value in marker_fields(record)]
    sd = f"[{SD_ID} {' '.join(params)}]" if params else "-"
    head = f"<{facility * 8 + severity}>1 {_rfc3339(when)} {host} {app} " \
           f"{os.getpid() if pid is None else pid} " \
           f"{record.kind} {sd} "
    return head.encode() + escape(format_record(record)).encode()


class SyslogSink:
    """RFC 5424 messages to ``address``: ``unix:/dev/log`` (the local socket, the
    default), ``udp://HOST:PORT`` or ``tcp://HOST:PORT``.  A transport for QueuedSink:
    it raises when the receiver cannot take a message."""

    def __init__(self, address: str = "unix:/dev/log", facility: str = "authpriv",
                 name: str = "syslog") -> None:
        if facility not in FACILITIES:
            raise ValueError(f"unknown syslog facility {facility!r}: choose from "
                             f"{', '.join(FACILITIES)}")
        self.name = name
        self.facility = FACILITIES[facility]
        self.host = socket.gethostname() or "-"
        self.address = address
        url = urlsplit(address)
        self.scheme = url.scheme
        if self.scheme == "unix":
            self.target: Any = url.path
        elif self.scheme in ("udp", "tcp"):
            if not url.hostname or not url.port:
                raise ValueError(f"syslog address {address!r} needs a host and a port")
            self.target = (url.hostname, url.port)
        else:
            raise ValueError(f"syslog address {address!r}: use unix:PATH, "
                             "udp://HOST:PORT or tcp://HOST:PORT")
        self.sock: socket.socket | None = None
        self.sent = 0

    def _connect(self) -> socket.socket:
        if self.sock is None:
            if self.scheme == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            elif self.scheme == "udp":
                sock = socket.socket(socket.AF_INET6 if ":" in self.target[0]
                                     else socket.AF_INET, socket.SOCK_DGRAM)
            else:
                sock = socket.create_connection(self.target, timeout=10)
            sock.settimeout(10)
            if self.scheme != "tcp":
                sock.connect(self.target)
            self.sock = sock
        return self.sock

    def _message(self, record: Record, pid: int) -> bytes:
        message = format_5424(record, self.facility, self.host, pid=pid)
        if self.scheme == "tcp":
            message = b"%d %b" % (len(message), message)        # octet counting
        return message

    def write(self, record: Record) -> None:
        self.write_many([record])

    def write_many(self, records: list[Record]) -> None:
        """Every record, in order: over TCP their frames in as few sends as the socket
        takes, else a datagram each; PartlySent when only the first few went."""
        pid = os.getpid()
        messages = [self._message(r, pid) for r in records]
        done = 0
        try:
            sock = self._connect()
            if self.scheme == "tcp":
                data = b"".join(messages)
                view, sent = memoryview(data), 0
                try:
                    while sent < len(data):
                        sent += sock.send(view[sent:])
                finally:                # the records whose frames went out whole
                    ends = itertools.accumulate(map(len, messages))
                    done = sum(1 for end in ends if end <= sent)
            else:
                for message in messages:
                    sock.send(message)
                    done += 1
        except OSError as exc:
            self.close()            # reconnect on the next try
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
