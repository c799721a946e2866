"""Linux audit's own text format, so that ausearch, aureport and the auditd parsers SIEMs
already have read our events unchanged:

    type=SYSCALL msg=audit(1733212345.123:42): arch=c000003e syscall=82 success=yes
        exit=0 items=2 ppid=.. pid=.. auid=.. uid=.. gid=.. euid=.. comm="mv"
        exe="/usr/bin/mv" key="passwd"
    type=CWD msg=audit(1733212345.123:42): cwd="/"
    type=PATH msg=audit(1733212345.123:42): item=0 name="/etc/passwd" inode=.. dev=08:01
        nametype=DELETE
    type=PATH msg=audit(...): item=1 name="/etc/passwd+" nametype=CREATE
    type=EOE msg=audit(1733212345.123:42):

The serial is the event's sequence number.  The format needs what the eBPF backend
reports (syscall, result, credentials): the daemon refuses this sink with the other
backends.  Values are written as auditd writes them:
a string that is plain is quoted; one with a space, a quote, a control character or a
byte that is not UTF-8 is written in hex (auditd's "untrusted string" encoding), which
ausearch -i decodes.  Fields we do not know are left out, never made up.
"""
from __future__ import annotations

import os
from typing import Any

from .. import ops, syscalls
from ..events import Event, Record

AUDIT_ARCH = {"x86_64": "c000003e", "aarch64": "c00000b7"}
AUDIT_ARCH_I386 = "40000003"
UNSET = 4294967295
# How each operation's names appear in PATH records (auditd's nametype).
NAMETYPES = {ops.CREATE: ("CREATE",), ops.MKDIR: ("CREATE",), ops.MKNOD: ("CREATE",),
             ops.SYMLINK: ("CREATE",), ops.LINK: ("NORMAL", "CREATE"),
             ops.RENAME: ("DELETE", "CREATE"), ops.UNLINK: ("DELETE",),
             ops.RMDIR: ("DELETE",)}


_MACHINE_ARCH = AUDIT_ARCH.get(os.uname().machine, "0")


def _plain(text: str) -> bool:
    return text.isprintable() and text.isascii() and " " not in text and '"' not in text


def untrusted(text: str) -> str:
    """auditd's encoding of a string field: quoted when plain, else hex of its bytes."""
    if _plain(text):
        return f'"{text}"'
    return text.encode("utf-8", "surrogateescape").hex().upper()


def _keys(keys: list[str]) -> str:
    if not keys:
        return "(null)"
    if len(keys) == 1:
        return untrusted(keys[0])
    # auditd joins several keys with \x01 and writes them in hex
    return "\x01".join(keys).encode("utf-8", "surrogateescape").hex().upper()


def _syscall_of(ev: Event) -> str:
    """The syscall an event came from: executions are seen at exec, whatever the
    exec call; an operation with no syscall of its own was submitted by io_uring."""
    if ev.syscall:
        return ev.syscall
    return "execve" if ev.op == ops.EXEC else "io_uring_enter"


def format_event(ev: Event) -> bytes:
    seconds, ns = divmod(ev.time, 10**9)
    stamp = f"msg=audit({seconds}.{ns // 10**6:03d}:{ev.seq}):"
    names = [n for n in (ev.path, ev.path2) if n is not None]
    arch = AUDIT_ARCH_I386 if ev.arch == "b32" else _MACHINE_ARCH
    fields: list[str] = [f"arch={arch}"]
    number = syscalls.syscall_numbers().get(_syscall_of(ev))
    fields.append(f"syscall={number if number is not None else '?'}")
    if ev.result is not None:
        fields.append(f"success={'yes' if ev.result >= 0 else 'no'} exit={ev.result}")
    else:
        fields.append("success=? exit=?")
    # the raw arguments are not recorded: "?" is auditd's own mark for "not known"
    # (ausearch and aureport need the four fields to be there)
    # the directories holding the names (auditd's PARENT items), after the names
    parents = [(os.path.dirname(n), ino) for n, ino in ((ev.path, ev.parent_ino),
                                                        (ev.path2, ev.parent2_ino))
               if n is not None and ino is not None]
    fields.append(f"a0=? a1=? a2=? a3=? items={len(names) + len(parents)}")
    for name, value in (("ppid", ev.ppid), ("pid", ev.pid), ("auid", ev.loginuid),
                        ("uid", ev.uid), ("gid", ev.gid), ("euid", ev.euid)):
        if value is not None:
            fields.append(f"{name}={value}")
    if ev.comm is not None:
        fields.append(f"comm={untrusted(ev.comm)}")
    if ev.exe is not None:
        fields.append(f"exe={untrusted(ev.exe)}")
    fields.append(f"key={_keys(ev.keys)}")
    lines = [f"type=SYSCALL {stamp} " + " ".join(fields)]
    kinds = NAMETYPES.get(ev.op, ("NORMAL", "NORMAL"))
    for item, name in enumerate(names):
        path = [f"item={item}", f"name={untrusted(name)}"]
        if item == 0 and ev.ino is not None:
            path.append(f"inode={ev.ino}")
        if item == 0 and ev.dev is not None:
            path.append(f"dev={os.major(ev.dev):02x}:{os.minor(ev.dev):02x}")
        if item == 0 and ev.ouid is not None:
            path.append(f"ouid={ev.ouid}")
        if item == 0 and ev.ogid is not None:
            path.append(f"ogid={ev.ogid}")
        path.append(f"nametype={kinds[min(item, len(kinds) - 1)]}")
        lines.append(f"type=PATH {stamp} " + " ".join(path))
    for item, (name, ino) in enumerate(parents, len(names)):
        path = [f"item={item}", f"name={untrusted(name)}", f"inode={ino}"]
        if ev.dev is not None:
            path.append(f"dev={os.major(ev.dev):02x}:{os.minor(ev.dev):02x}")
        path.append("nametype=PARENT")
        lines.append(f"type=PATH {stamp} " + " ".join(path))
    lines.append(f"type=EOE {stamp}")
    return ("\n".join(lines) + "\n").encode()


class AuditdEncoder:
    """Events as auditd text records; other records (and file headers) have no auditd
    form and are left out of this encoding (the msgpack log keeps them)."""

    def encode(self, record: Record) -> bytes:
        return format_event(record) if isinstance(record, Event) else b""

    def encode_map(self, data: dict[str, Any]) -> bytes:
        return b""
