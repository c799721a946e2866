"""fanotify kernel binding: constants, record layouts, the calls, and raw event records.

Raw kernel interface through ctypes (fanotify_init, fanotify_mark, open_by_handle_at):
no PyPI binding reports directory file handles with names (FAN_REPORT_DFID_NAME) and
FAN_RENAME, which the fanotify backend is built on, and the interface is a few structs.
What the records mean for an audit is the backend's business (backends/fanotify.py);
this module only reads them into RawEvent.
"""
from __future__ import annotations

import ctypes
import os
import re
import select
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

# fanotify_init flags
FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_UNLIMITED_QUEUE = 0x10
FAN_REPORT_PIDFD = 0x80
FAN_REPORT_FID = 0x200
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800
FAN_REPORT_TARGET_FID = 0x1000     # Linux 5.17: the child's own handle on entry events
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME
# fanotify_mark flags
FAN_MARK_ADD = 0x1
FAN_MARK_REMOVE = 0x2
FAN_MARK_DONT_FOLLOW = 0x4
FAN_MARK_INODE = 0x0
FAN_MARK_FILESYSTEM = 0x100
# event bits
FAN_ATTRIB = 0x4
FAN_CLOSE_WRITE = 0x8
FAN_CLOSE_NOWRITE = 0x10
FAN_CREATE = 0x100
FAN_DELETE = 0x200
FAN_OPEN_EXEC = 0x1000
FAN_Q_OVERFLOW = 0x4000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_RENAME = 0x10000000
FAN_ONDIR = 0x40000000
# info record types
INFO_FID, INFO_DFID_NAME, INFO_DFID, INFO_PIDFD = 1, 2, 3, 4
INFO_OLD_DFID_NAME, INFO_NEW_DFID_NAME = 10, 12
HANDLE_INFOS = (INFO_FID, INFO_DFID, INFO_DFID_NAME, INFO_OLD_DFID_NAME, INFO_NEW_DFID_NAME)
NAMED_INFOS = (INFO_DFID_NAME, INFO_OLD_DFID_NAME, INFO_NEW_DFID_NAME)
# the pidfd info record when there is no pidfd: the process had exited / creating it failed
FAN_NOPIDFD, FAN_EPIDFD = -1, -2

METADATA = struct.Struct("<IBBHQii")           # event_len, vers, reserved, len, mask, fd, pid
INFO_HEADER = struct.Struct("<BBH")             # info_type, pad, len
FSID_AND_HANDLE = struct.Struct("<QIi")         # fsid (as statvfs f_fsid), handle_bytes,
#                                                 handle_type
PIDFD = struct.Struct("<i")
READ_SIZE = 1 << 16
O_PATH = getattr(os, "O_PATH", 0o10000000)
AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_statx = getattr(_libc, "statx", None)
if _statx is not None:
    _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                       ctypes.c_char_p]
AT_EMPTY_PATH = 0x1000
STATX_BTIME = 0x800
STATX_SIZE = 256
STATX_BTIME_AT = struct.Struct("<qI")           # struct statx_timestamp at offset 80


@dataclass(slots=True)
class Info:
    """A file-handle info record: ``handle`` is a struct file_handle (handle_bytes,
    handle_type, f_handle) as open_by_handle_at takes it; ``name`` the entry name
    for the records that carry one."""
    handle: bytes
    name: str | None = None
    fsid: int = 0           # the filesystem, as os.statvfs(path).f_fsid gives it


@dataclass(slots=True)
class RawEvent:
    """One event record as the kernel wrote it."""
    mask: int
    pid: int
    pidfd: int | None = None        # None: not reported; FAN_NOPIDFD, FAN_EPIDFD or an fd
    infos: dict[int, Info] = field(default_factory=dict)   # info type -> record


def init(flags: int) -> int:
    """fanotify_init with read-only event file descriptors; the group's fd."""
    fd = _libc.fanotify_init(flags, os.O_RDONLY | os.O_CLOEXEC | os.O_LARGEFILE)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def mark(fd: int, flags: int, mask: int, path: str) -> None:
    if _libc.fanotify_mark(fd, flags, mask, AT_FDCWD, os.fsencode(path)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fanotify_mark {path}: {os.strerror(err)}")


def open_by_handle(mount_fd: int, handle: bytes, flags: int = O_PATH | os.O_CLOEXEC) -> int:
    """open_by_handle_at through any file of the handle's filesystem."""
    fd = _libc.open_by_handle_at(mount_fd, handle, flags)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def birth_time(fd: int) -> int | None:
    """The inode's birth time (statx btime, ns since the epoch) of an open file, or None
    where the filesystem does not record it."""
    if _statx is None:
        return None
    buf = ctypes.create_string_buffer(STATX_SIZE)
    if _statx(fd, b"", AT_EMPTY_PATH, STATX_BTIME, buf) < 0:
        return None
    mask = struct.unpack_from("<I", buf.raw, 0)[0]
    if not mask & STATX_BTIME:
        return None
    sec, nsec = STATX_BTIME_AT.unpack_from(buf.raw, 80)
    return sec * 1_000_000_000 + nsec


def mounts_below(directory: str) -> list[str]:
    """Mount points strictly below a directory, from /proc/self/mountinfo, in order."""
    prefix = directory.rstrip("/") + "/"
    out: list[str] = []
    try:
        with open("/proc/self/mountinfo", "rb") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split(b" ")
        if len(fields) < 5:
            continue
        point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]),
                       fields[4]).decode(errors="surrogateescape")
        if point.startswith(prefix) and point not in out:
            out.append(point)
    return out


def process_exited(pidfd: int) -> bool:
    """Whether the process of a pidfd has exited (a zombie has: its pidfd polls readable)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def parse_infos(data: bytes, pos: int, end: int) -> tuple[int | None, dict[int, Info]]:
    """The info records between pos and end: (pidfd or None, handle records by type)."""
    pidfd = None
    infos: dict[int, Info] = {}
    while pos + INFO_HEADER.size <= end:
        info_type, _, length = INFO_HEADER.unpack_from(data, pos)
        if length == 0:
            break
        body = pos + INFO_HEADER.size
        if info_type == INFO_PIDFD:
            pidfd = PIDFD.unpack_from(data, body)[0]
        elif info_type in HANDLE_INFOS:
            fsid, hbytes, _ = FSID_AND_HANDLE.unpack_from(data, body)
            hstart = body + 8                   # the file_handle follows the fsid
            handle = data[hstart:hstart + 8 + hbytes]
            name = None
            if info_type in NAMED_INFOS:
                nstart = hstart + 8 + hbytes
                name = data[nstart:pos + length].split(b"\0", 1)[0].decode(
                    errors="surrogateescape")
            infos[info_type] = Info(handle, name, fsid)
        pos += length
    return pidfd, infos


def parse(data: bytes) -> list[RawEvent]:
    """The event records of one read.  Event file descriptors (none in FID modes) are
    closed here; pidfds are handed on in the records, for the caller to close."""
    out: list[RawEvent] = []
    pos = 0
    while pos + METADATA.size <= len(data):
        ev_len, _, _, meta_len, mask, fd, pid = METADATA.unpack_from(data, pos)
        if ev_len < METADATA.size:
            break
        if fd >= 0:
            os.close(fd)
        pidfd, infos = parse_infos(data, pos + meta_len, pos + ev_len)
        out.append(RawEvent(mask, pid, pidfd, infos))
        pos += ev_len
    return out


def read_events(fd: int, timeout: float) -> Iterator[RawEvent]:
    """Every queued event of a non-blocking group, waiting at most ``timeout`` seconds
    for the first.  One buffer is read at a time, when the previous one is used up, so
    that only one buffer's pidfds are open at once; those the caller did not take (it
    stopped early) are closed."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(int(timeout * 1000)):
        return
    while True:
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        if not data:
            return
        batch = parse(data)
        taken = 0
        try:
            for ev in batch:
                taken += 1
                yield ev
        finally:
            for ev in batch[taken:]:
                if ev.pidfd is not None and ev.pidfd >= 0:
                    os.close(ev.pidfd)
