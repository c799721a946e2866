"""msgpack-framed audit logs: a buffered writer that never blocks the event path, and a
streaming reader that survives a torn last record.

Format (version 1).  A log file is a plain concatenation of msgpack maps, each with a
type tag "t":
  {"t": "hdr", "version": 1, "host", "boot_id", "start", "backend", "rules_digest", ...}
        first in every file the writer opens (also after each rotation)
  {"t": "ev", ...Event.to_dict()}          one audited operation (the JSON schema's keys)
  {"t": "state", ...ProcessState.to_dict()} a process entering a per-process audit
  {"t": "lost", "time", "counts": {source: n}}  events lost so far, per source
  {"t": "rules", "time", "reason", "rules": [...], "digest"}  the rules now in force
  {"t": "dropped", "time", "count", "reason"}  records this writer could not store
A reader skips tags it does not know.  The writer writes whole records only; after a
failed or partial write it truncates the file back to the last whole record.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

import msgpack

from . import diag
from .events import Event, ProcessState, format_human

FORMAT_VERSION = 1
READ_CHUNK = 1 << 16
DEFAULT_HIGH_WATER = 4 << 20          # bytes buffered before an early flush
DEFAULT_MEMORY_LIMIT = 256 << 20      # bytes kept while the disk refuses them
DISK_FULL_ACTIONS = ("keep-going", "drop-oldest", "stop")
FSYNC_POLICIES = ("flush", "rotate", "never")
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class LogFormatError(ValueError):
    """Data in a log that is not a whole record where one must be."""


class DiskFull(OSError):
    """The log file system is full, or below the configured space left."""


def parse_size(value: int | str) -> int:
    """Bytes from 123, "64K", "8M", "1G"."""
    if isinstance(value, int):
        return value
    text = str(value).strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


class LogWriter:
    """Appends records to a log through an in-memory buffer and a writer thread.

    ``write*`` only packs and appends to the buffer (no disk I/O in the caller); the
    thread writes every ``flush_interval`` seconds, as soon as the buffer passes
    ``high_water`` bytes, and on ``close()``.
    """

    def __init__(self, path: str, header: dict[str, Any], flush_interval: float = 1.0,
                 fsync: str = "rotate", rotate_size: int | str = 0, rotate_count: int = 5,
                 disk_full: str = "keep-going", space_left: int | str = 0,
                 high_water: int = DEFAULT_HIGH_WATER,
                 memory_limit: int = DEFAULT_MEMORY_LIMIT) -> None:
        self.path = os.path.abspath(path)
        self.dir, self.name = os.path.split(self.path)
        self.header = dict(header)
        self.high_water = high_water
        self.memory_limit = memory_limit
        self.configure(flush_interval=flush_interval, fsync=fsync, rotate_size=rotate_size,
                       rotate_count=rotate_count, disk_full=disk_full,
                       space_left=space_left)
        self.log = diag.get_logger("log")
        self._packer = msgpack.Packer()
        self._lock = threading.Lock()            # guards the buffer
        self._write_lock = threading.Lock()      # one writer of the file at a time
        self._wake = threading.Condition(self._lock)
        self._buf: list[bytes] = []
        self._buf_bytes = 0
        self._closing = False
        self._closed = False
        self.records_written = 0
        self.bytes_written = 0
        self.records_dropped = 0
        self._gap_noted = self._gap_pending = 0   # dropped records already reported
        self.last_error: str | None = None
        self.stopped = False
        self.stop_reason: str | None = None
        self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                               | os.O_CLOEXEC)
        self._fd = -1
        self._size = 0
        self._open_current()
        self._thread = threading.Thread(target=self._run, name="fswatchaudit-log",
                                        daemon=True)
        self._thread.start()

    def configure(self, flush_interval: float = 1.0, fsync: str = "rotate",
                  rotate_size: int | str = 0, rotate_count: int = 5,
                  disk_full: str = "keep-going", space_left: int | str = 0) -> None:
        """(Re)set the policies; safe while running (a reload)."""
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}")
        if disk_full not in DISK_FULL_ACTIONS:
            raise ValueError(f"disk_full must be one of {', '.join(DISK_FULL_ACTIONS)}")
        self.flush_interval = flush_interval
        self.fsync = fsync
        self.rotate_size = parse_size(rotate_size)
        self.rotate_count = rotate_count
        self.disk_full = disk_full
        self.space_left = space_left

    # -- files ---------------------------------------------------------------------
    def _open_current(self) -> None:
        """Open (creating 0600, never through a symlink) and start with a header."""
        fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600, dir_fd=self._dir_fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, f"log {self.path} is not a regular file")
        self._fd, self._size = fd, st.st_size
        record = self._packer.pack({"t": "hdr", "version": FORMAT_VERSION, **self.header})
        # a file always starts with its header: the space_left threshold is for events
        self._write_all([record], check_space=False)

    def _rotated(self, n: int) -> str:
        return f"{self.name}.{n}"

    def _exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def _rotate_files(self) -> str | None:
        """Current -> .1 -> .2 ..., keeping rotate_count; returns the newest rotated."""
        if self.fsync in ("flush", "rotate"):
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        newest = None
        if self.rotate_count > 0:
            for n in range(self.rotate_count - 1, 0, -1):
                if self._exists(self._rotated(n)):
                    os.rename(self._rotated(n), self._rotated(n + 1),
                              src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
            os.rename(self.name, self._rotated(1), src_dir_fd=self._dir_fd,
                      dst_dir_fd=self._dir_fd)
            newest = os.path.join(self.dir, self._rotated(1))
        else:
            os.unlink(self.name, dir_fd=self._dir_fd)
        self._open_current()
        return newest

    def _drop_oldest(self) -> bool:
        for n in range(max(self.rotate_count, 1) + 8, 0, -1):
            if self._exists(self._rotated(n)):
                os.unlink(self._rotated(n), dir_fd=self._dir_fd)
                self.log.error("LOG DISK FULL: deleted the oldest rotated log",
                               file=os.path.join(self.dir, self._rotated(n)))
                return True
        return False

    def _check_space(self, need: int) -> None:
        threshold = self.space_left
        if not threshold:
            return
        vfs = os.fstatvfs(self._fd)
        free = vfs.f_bavail * vfs.f_frsize
        if isinstance(threshold, str) and threshold.endswith("%"):
            limit = int(vfs.f_blocks * vfs.f_frsize * float(threshold[:-1]) / 100)
        else:
            limit = parse_size(threshold)
        if free - need < limit:
            raise DiskFull(errno.ENOSPC, f"free space {free} bytes is below {limit}")

    def _write_all(self, records: list[bytes], check_space: bool = True) -> None:
        """Write whole records or nothing: on failure the file is cut back."""
        data = b"".join(records)
        start = self._size
        if check_space:
            self._check_space(len(data))
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise
        self._size = start + len(data)
        self.bytes_written += len(data)

    # -- writing -------------------------------------------------------------------
    def write(self, record: dict[str, Any]) -> None:
        """Queue one record (a dict with its "t" tag); never touches the disk."""
        packed = self._packer.pack(record)
        with self._lock:
            if self._closed:
                raise ValueError("log writer is closed")
            if self._buf_bytes + len(packed) > self.memory_limit:
                self.records_dropped += 1
                return
            self._buf.append(packed)
            self._buf_bytes += len(packed)
            if self._buf_bytes >= self.high_water:
                self._wake.notify()

    def write_event(self, ev: Event) -> None:
        self.write({"t": "ev", **ev.to_dict()})

    def write_state(self, st: ProcessState) -> None:
        self.write({"t": "state", **st.to_dict()})

    def write_lost(self, counts: dict[str, int]) -> None:
        self.write({"t": "lost", "time": time.time_ns(), "counts": dict(counts)})

    def write_rules(self, rules: list[str], digest: str, reason: str = "") -> None:
        self.write({"t": "rules", "time": time.time_ns(), "reason": reason,
                    "rules": list(rules), "digest": digest})

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._closing and self._buf_bytes < self.high_water:
                    self._wake.wait(self.flush_interval)
                closing = self._closing
            self.flush()
            if closing:
                return

    def flush(self) -> None:
        """Write what is buffered now (the writer thread calls this; tests may too)."""
        with self._lock:
            batch, self._buf, self._buf_bytes = self._buf, [], 0
        if not batch:
            return
        with self._write_lock:
            self._store(batch)

    def _store(self, batch: list[bytes]) -> None:
        if self.stopped:
            self.records_dropped += len(batch)
            return
        while True:
            try:
                if self.rotate_size and self._size + sum(map(len, batch)) > self.rotate_size \
                        and self._size > 0:
                    self._rotate_files()
                gap = self._gap_record()
                self._write_all(gap + batch)
                self.records_written += len(gap) + len(batch)
                if gap:
                    self._gap_noted = self._gap_pending
                if self.fsync == "flush":
                    os.fsync(self._fd)
                if self.last_error:
                    self.log.info("log writes work again", file=self.path)
                    self.last_error = None
                return
            except OSError as exc:
                full = isinstance(exc, DiskFull) or exc.errno in DISK_FULL_ERRNOS
                self.last_error = f"{exc.strerror or exc}"
                if full and self.disk_full == "drop-oldest" and self._drop_oldest():
                    continue        # one rotated file fewer: try again
                if full and self.disk_full == "stop":
                    self.stopped = True
                    self.stop_reason = f"log disk full: {self.last_error}"
                self.records_dropped += len(batch)
                self.log.error("LOG WRITE FAILED: records dropped" if not full else
                               "LOG DISK FULL: records dropped", file=self.path,
                               error=self.last_error, dropped=len(batch),
                               action=self.disk_full if full else "count")
                return

    def _gap_record(self) -> list[bytes]:
        """A "dropped" record written in front of the first batch stored after records
        were dropped, so that a reader sees where coverage has a gap."""
        total = self.records_dropped
        if total <= self._gap_noted:
            return []
        self._gap_pending = total
        return [self._packer.pack({"t": "dropped", "time": time.time_ns(),
                                   "count": total - self._gap_noted, "total": total,
                                   "reason": self.last_error or "memory limit"})]

    def rotate(self) -> str | None:
        """Rotate now (SIGUSR1, ctl --rotate): flush, move files along, reopen."""
        self.flush()
        with self._write_lock:
            return self._rotate_files()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            buffered = self._buf_bytes
        return {"log_file": self.path, "records_written": self.records_written,
                "bytes_written": self.bytes_written, "records_dropped": self.records_dropped,
                "buffer_bytes": buffered, "buffer_fill": round(buffered / self.high_water, 3),
                "log_error": self.last_error, "log_stopped": self.stopped}

    def close(self) -> None:
        """Flush everything and close; idempotent, and safe after a signal."""
        with self._lock:
            if self._closed:
                return
            self._closing = True
            self._wake.notify()
        self._thread.join()
        with self._lock:
            self._closed = True
        self.flush()
        if self._fd >= 0:
            if self.fsync in ("flush", "rotate"):
                try:
                    os.fsync(self._fd)
                except OSError:
                    pass
            os.close(self._fd)
            self._fd = -1
        os.close(self._dir_fd)


# -- reading -------------------------------------------------------------------------

class LogReader:
    """Streams the records of one file; after iteration, ``torn`` is the number of bytes
    of an incomplete last record (0 for a clean file)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.torn = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        fed = whole = 0
        with open(self.path, "rb") as fh:
            while True:
                chunk = fh.read(READ_CHUNK)
                if not chunk:
                    break
                unpacker.feed(chunk)
                fed += len(chunk)
                while True:
                    start = whole
                    try:
                        obj = unpacker.unpack()
                    except msgpack.OutOfData:
                        break
                    except (msgpack.FormatError, msgpack.StackError, ValueError) as exc:
                        raise LogFormatError(f"{self.path}: not a log record at byte "
                                             f"{start}: {exc}") from None
                    if not isinstance(obj, dict) or "t" not in obj:
                        raise LogFormatError(f"{self.path}: not a log record at byte {start}")
                    whole = unpacker.tell()
                    yield obj
        self.torn = fed - whole


def rotated_files(path: str) -> list[str]:
    """path.N ... path.1 path: a log with its rotated predecessors, oldest first."""
    d, name = os.path.split(os.path.abspath(path))
    numbers = []
    for entry in os.listdir(d or "."):
        head, _, tail = entry.rpartition(".")
        if head == name and tail.isdigit():
            numbers.append(int(tail))
    return [f"{path}.{n}" for n in sorted(numbers, reverse=True)] + [path]


def iter_records(paths: list[str], err: TextIO | None = None) -> Iterator[dict[str, Any]]:
    for path in paths:
        reader = LogReader(path)
        yield from reader
        if reader.torn and err is not None:
            print(f"fswatchaudit: {path}: last record is torn ({reader.torn} bytes "
                  "ignored); every record before it was read", file=err)


def _human(record: dict[str, Any]) -> str:
    kind = record.get("t")
    if kind == "ev":
        return format_human(Event.from_dict(record))
    if kind == "hdr":
        return (f"# log: host={record.get('host')} backend={record.get('backend')} "
                f"start={record.get('start')} rules={record.get('rules_digest')}")
    if kind == "lost":
        return f"# lost: {record.get('counts')}"
    if kind == "rules":
        return f"# rules ({record.get('reason')}): {len(record.get('rules', []))} rules, " \
               f"digest {record.get('digest')}"
    if kind == "state":
        import dataclasses

        from .events import format_state
        known = {f.name for f in dataclasses.fields(ProcessState)}
        return format_state(ProcessState(**{k: v for k, v in record.items() if k in known}))
    return f"# {kind}: {record}"


def show(paths: list[str], as_json: bool = False, out: TextIO = sys.stdout,
         err: TextIO = sys.stderr, all_rotated: bool = False) -> int:
    """`log show`: events as human lines or JSON lines (events with exactly the schema
    keys; other records with their "t" tag)."""
    files: list[str] = []
    for p in paths:
        files += rotated_files(p) if all_rotated else [p]
    for record in iter_records(files, err):
        if as_json:
            if record.get("t") == "ev":
                record = {k: v for k, v in record.items() if k != "t"}
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
        else:
            out.write(_human(record) + "\n")
    return 0
