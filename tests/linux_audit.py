"""Linux audit as a reference: a private auditd, and its log read back as events.

The benchmark measures our cost against `auditctl -w`, and the comparison tests check
that we record everything it records; both start auditd the same way, with a
configuration and a log of their own, and put the host's audit settings back after.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field

AUDITD_CONF = """\
log_file = {log}
log_format = RAW
log_group = root
priority_boost = 4
flush = INCREMENTAL_ASYNC
freq = 50
num_logs = 5
max_log_file = 0
max_log_file_action = IGNORE
space_left = 2
space_left_action = IGNORE
admin_space_left = 1
admin_space_left_action = IGNORE
disk_full_action = IGNORE
disk_error_action = IGNORE
"""


def audit_status() -> dict[str, int]:
    out = subprocess.run(["auditctl", "-s"], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"^(\w+) (\d+)", out, re.M)}


def auditctl(*args: str, check: bool = True) -> None:
    subprocess.run(["auditctl", *args], check=check, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


class Auditd:
    """auditd with its own config and log (unless one already runs), auditing enabled."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None
        self.log: str | None = None
        self.before = audit_status()

    def __enter__(self) -> Auditd:
        if not self.before.get("pid") and shutil.which("auditd"):
            conf = os.path.join(self.tmp, "auditd")
            os.makedirs(conf, exist_ok=True)
            self.log = os.path.join(conf, "audit.log")
            with open(os.path.join(conf, "auditd.conf"), "w") as fh:
                fh.write(AUDITD_CONF.format(log=self.log))
            os.chmod(os.path.join(conf, "auditd.conf"), 0o640)
            self.proc = subprocess.Popen(["auditd", "-n", "-c", conf],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while not audit_status().get("pid"):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("auditd did not start")
                time.sleep(0.05)
        # one setting per call: auditctl applies only the first of several
        auditctl("-e", "1")
        auditctl("-b", "8192")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
        # auditd leaves auditing enabled; every process forked then pays for it
        auditctl("-b", str(self.before.get("backlog_limit", 64)), check=False)
        auditctl("-e", str(self.before.get("enabled", 0)), check=False)

    def size(self) -> int:
        return os.path.getsize(self.log) if self.log and os.path.exists(self.log) else 0

    def read(self, since: int = 0) -> bytes:
        """The log written after byte offset since."""
        if self.log is None:
            return b""
        with open(self.log, "rb") as fh:
            fh.seek(since)
            return fh.read()

    def count(self, since: int, key: str) -> int | None:
        """SYSCALL records with key written to our log after byte offset since."""
        if self.log is None:
            return None
        return sum(1 for line in self.read(since).splitlines()
                   if line.startswith(b"type=SYSCALL") and key.encode() in line)

    def settle(self, since: int, timeout: float = 10.0) -> None:
        """Wait until auditd has written everything the kernel queued (it writes
        asynchronously): the log stops growing and the kernel backlog is empty."""
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            size = self.size()
            if size == last and audit_status().get("backlog", 0) == 0:
                return
            last = size
            time.sleep(0.3)


# -- the log as events ------------------------------------------------------------------

_FIELD = re.compile(rb'(\w+)=("[^"]*"|\S+)')
_SERIAL = re.compile(rb"msg=audit\(\d+\.\d+:(\d+)\)")


_TEXT_FIELDS = {"name", "cwd", "comm", "exe", "key", "proctitle"}


def _value(name: str, raw: bytes) -> bytes:
    """A field's value: quoted text as is; a text field unquoted is hex (auditd's
    encoding of names with odd bytes); anything else as is."""
    if raw.startswith(b'"'):
        return raw[1:-1]
    if name in _TEXT_FIELDS and raw != b"(null)":
        return bytes.fromhex(raw.decode())
    return raw


@dataclass
class AuditEvent:
    """One audited syscall: its SYSCALL record's fields and its PATH items."""
    serial: int
    fields: dict[str, bytes]
    cwd: bytes = b""
    paths: list[dict[str, bytes]] = field(default_factory=list)

    def num(self, name: str) -> int:
        return int(self.fields[name])

    @property
    def success(self) -> bool:
        return self.fields.get("success") == b"yes"

    def names(self) -> set[bytes]:
        """Names of the objects the syscall acted on (not their parents): absolute, or
        as the process wrote them when relative to a directory fd (audit does not say
        which directory; only the cwd is in the record)."""
        out = set()
        for item in self.paths:
            name = item.get("name")
            if not name or name == b"(null)" or item.get("nametype") == b"PARENT":
                continue
            out.add(os.path.normpath(name))
        return out


def audit_events(log: bytes, key: str) -> list[AuditEvent]:
    """The log's syscall events carrying key, in order, with their PATH and CWD items."""
    by_serial: dict[int, AuditEvent] = {}
    extra: dict[int, list[tuple[bytes, dict[str, bytes]]]] = {}
    for line in log.splitlines():
        m = _SERIAL.search(line)
        if not m:
            continue
        serial = int(m.group(1))
        kind = line.split(b" ", 1)[0][len(b"type="):]
        body = line.split(b"): ", 1)[-1]
        fields = {k.decode(): _value(k.decode(), v) for k, v in _FIELD.findall(body)}
        if kind == b"SYSCALL":
            if fields.get("key") == key.encode():
                by_serial[serial] = AuditEvent(serial, fields)
        elif kind in (b"PATH", b"CWD"):
            extra.setdefault(serial, []).append((kind, fields))
    for serial, items in extra.items():
        ev = by_serial.get(serial)
        if ev is None:
            continue
        for kind, fields in items:
            if kind == b"CWD":
                ev.cwd = fields.get("cwd", b"")
            else:
                ev.paths.append(fields)
    return [by_serial[s] for s in sorted(by_serial)]
