"""sd_notify without python-systemd: one datagram per state change to $NOTIFY_SOCKET.

The protocol is a newline-separated list of KEY=VALUE assignments sent as a single
datagram to the AF_UNIX socket named by $NOTIFY_SOCKET (a path, or an abstract
address written with a leading '@').  With no $NOTIFY_SOCKET every call does nothing,
so the daemon runs the same with and without systemd.
"""
from __future__ import annotations

import os
import socket
import threading
import time


class Notifier:
    """Sends sd_notify messages; never raises (a missing manager must not stop auditing)."""

    def __init__(self, address: str | None = None) -> None:
        if address is None:
            address = os.environ.get("NOTIFY_SOCKET") or None
        self.address: str | bytes | None = None
        if address:
            if address.startswith("@"):
                self.address = b"\0" + address[1:].encode()
            elif address.startswith("/"):
                self.address = address
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.errors = 0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: object) -> bool:
        """Send KEY=VALUE lines (keyword names are upper-cased); True when delivered."""
        if self.address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\n", " ")
            lines.append(f"{key.upper()}={text}")
        data = ("\n".join(lines) + "\n").encode()
        with self._lock:
            try:
                if self._sock is None:
                    # non-blocking: a manager that does not read must not stall us
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM
                                               | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
                self._sock.sendto(data, self.address)
                return True
            except OSError:
                self.errors += 1
                return False

    def ready(self, status: str | None = None) -> bool:
        extra = {"status": status} if status else {}
        return self.notify(ready=1, **extra)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match the reload up.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(reloading=1, monotonic_usec=usec)

    def stopping(self) -> bool:
        return self.notify(stopping=1)

    def status(self, text: str) -> bool:
        return self.notify(status=text)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

