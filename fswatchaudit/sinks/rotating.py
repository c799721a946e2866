"""The msgpack log file sink: a buffered writer that never blocks the event path,
flushes once a second, rotates, and stores whole records only.

Format (version 1).  A log file is a plain concatenation of msgpack maps, each with a
kind tag "t": first ``{"t": "hdr", "version": 1, "host", "boot_id", "start", "backend",
"rules_digest", "rules", ...}`` (in every file the writer opens, also after each
rotation), then the stream's records (events.py documents their kinds), and
``{"t": "dropped", "time", "count", "total", "reason"}`` in front of the first records
stored after some could not be.  After a failed or partial write the file is cut back
to the last whole record.
"""
from __future__ import annotations

import errno
import os
import stat
import threading
import time
from typing import Any

from .. import diag
from ..events import Marker, Record, RulesInForce
from ..units import parse_size, threshold_bytes
from .encode import Encoder, MsgpackEncoder
from .integrity import Chain

FORMAT_VERSION = 1
DEFAULT_HIGH_WATER = 4 << 20          # bytes buffered before an early flush
DEFAULT_MEMORY_LIMIT = 256 << 20      # bytes kept while the disk refuses them
DISK_FULL_ACTIONS = ("keep-going", "drop-oldest", "stop")
FSYNC_POLICIES = ("flush", "rotate", "never")
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """The log file system is full, or below the configured space left."""


def unsafe_log_file(st: os.stat_result) -> str | None:
    """Why an existing file must not receive audit records (None: it may): anything but
    a regular file of ours that nobody else can read or write and that has no other
    name (another user could read or truncate what we write)."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by this process's user"
    if st.st_mode & 0o077:
        return f"others may read or write it (mode {stat.S_IMODE(st.st_mode):04o})"
    if st.st_nlink != 1:
        return f"it has {st.st_nlink} names (hard links)"
    return None


class RotatingFileSink:
    """Appends records to a log through an in-memory buffer and a writer thread.

    ``write`` only encodes and appends to the buffer (no disk I/O in the caller); the
    thread writes every ``flush_interval`` seconds, as soon as the buffer passes
    ``high_water`` bytes, on ``sync()`` and on ``close()``.
    """

    name = "log"

    def __init__(self, path: str, header: dict[str, Any], flush_interval: float = 1.0,
                 fsync: str = "rotate", rotate_size: int | str = 0, rotate_count: int = 5,
                 disk_full: str = "keep-going", space_left: int | str = 0,
                 high_water: int = DEFAULT_HIGH_WATER,
                 memory_limit: int = DEFAULT_MEMORY_LIMIT,
                 encoder: Encoder | None = None, integrity: Chain | None = None) -> None:
        self.path = os.path.abspath(path)
        self.encoder: Encoder = encoder or MsgpackEncoder()
        self.dir, self.filename = os.path.split(self.path)
        self.header = dict(header)
        self.high_water = high_water
        self.memory_limit = memory_limit
        self.configure(flush_interval=flush_interval, fsync=fsync, rotate_size=rotate_size,
                       rotate_count=rotate_count, disk_full=disk_full,
                       space_left=space_left)
        self.log = diag.get_logger("log")
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
        self._full: OSError | None = None
        self.stopped = False
        self.stop_reason: str | None = None
        self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                               | os.O_CLOEXEC)
        self._fd = -1
        self._size = 0
        self.integrity = integrity              # hash chain and seals (integrity.py)
        # sinks that get the chain head after each write (remote receivers, so that a
        # tail cut off here is seen from outside), and whether it moved since
        self.heads_to: list[Any] = []
        self._head_sent: dict[str, Any] | None = None
        self._head_lock = threading.Lock()
        self.heads_sent = 0
        if integrity is not None:
            integrity.attach(self._dir_fd, self.filename)
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
        try:
            fd = os.open(self.filename, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                         | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600,
                         dir_fd=self._dir_fd)
        except OSError as exc:
            why = {errno.ELOOP: "it is a symbolic link (not followed)",
                   errno.ENXIO: "not a regular file (a FIFO)"}.get(exc.errno or 0)
            if why is None:
                raise
            raise OSError(errno.EPERM, f"refusing to write audit records into "
                                       f"{self.path}: {why}") from None
        problem = unsafe_log_file(os.fstat(fd))
        if problem is not None:
            os.close(fd)
            raise OSError(errno.EPERM, f"refusing to write audit records into {self.path}: "
                                       f"{problem}")
        self._fd, self._size = fd, os.fstat(fd).st_size
        record = self.encoder.encode_map({"t": "hdr", "version": FORMAT_VERSION,
                                          **self.header})
        # a file always starts with its header: the space_left threshold is for events
        self._write_all([record], check_space=False)

    def _rotated(self, n: int) -> str:
        return f"{self.filename}.{n}"

    def _exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def _rotate_files(self) -> str | None:
        """Current -> .1 -> .2 ..., keeping rotate_count; returns the newest rotated."""
        self._seal(final=True, reason="rotate")
        self._send_head()               # the file's last head, before the next begins
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
            os.rename(self.filename, self._rotated(1), src_dir_fd=self._dir_fd,
                      dst_dir_fd=self._dir_fd)
            newest = os.path.join(self.dir, self._rotated(1))
        else:
            os.unlink(self.filename, dir_fd=self._dir_fd)
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
        limit = threshold_bytes(threshold, vfs.f_blocks * vfs.f_frsize)
        if free - need < limit:
            raise DiskFull(errno.ENOSPC, f"free space {free} bytes is below {limit}")

    def _write_all(self, records: list[bytes], check_space: bool = True) -> None:
        """Write whole records or nothing: on failure the file is cut back."""
        if self.integrity is not None:         # each record gets its chain hash
            records = self.integrity.link(records)
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
        if self.integrity is not None:         # the chain moves on only when written
            self.integrity.commit()
        self._size = start + len(data)
        self.bytes_written += len(data)

    # -- writing -------------------------------------------------------------------
    def write(self, record: Record) -> None:
        """Queue one record; never touches the disk.  A change of rules also becomes
        the header of every file begun later, so that each file can be read alone."""
        if isinstance(record, RulesInForce):
            self.header = {**self.header, "rules": list(record.rules),
                           "rules_digest": record.digest}
        self._enqueue(self.encoder.encode(record))

    @property
    def encoding(self) -> str | None:
        """The shared encoding this sink stores (base.Fanout), None for its own."""
        return "msgpack" if type(self.encoder) is MsgpackEncoder else None

    def write_many(self, records: list[Record]) -> None:
        """Queue a batch: encoded first (a record that cannot be encoded raises before
        anything is queued), then added under one lock."""
        encode = self.encoder.encode
        self.write_encoded(records, [encode(record) for record in records])

    def write_encoded(self, records: list[Record], packed: list[bytes]) -> None:
        """Queue a batch already encoded with this sink's encoding."""
        for record in records:
            if type(record) is RulesInForce:
                self.header = {**self.header, "rules": list(record.rules),
                               "rules_digest": record.digest}
        with self._lock:
            if self._closed:
                raise ValueError("log writer is closed")
            room = self.memory_limit - self._buf_bytes
            size = sum(map(len, packed))
            if size > room:                     # keep what fits, count the rest
                kept = []
                for p in packed:
                    if len(p) <= room:
                        kept.append(p)
                        room -= len(p)
                    else:
                        self.records_dropped += 1
                packed = kept
                size = sum(map(len, packed))
            self._buf += packed
            self._buf_bytes += size
            if self._buf_bytes >= self.high_water:
                self._wake.notify()

    def _enqueue(self, packed: bytes) -> None:
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

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._closing and self._buf_bytes < self.high_water:
                    self._wake.wait(self.flush_interval)
                closing = self._closing
            self.sync()
            if closing:
                return
            if self.integrity is not None and self.integrity.seal_due():
                with self._write_lock:
                    self._seal(final=False, reason="interval")
            with self._write_lock:          # a head consistent with what is written
                self._send_head()

    def _send_head(self) -> None:
        """The latest chain head, when it moved, to ``heads_to`` as a ``head`` marker
        (``host``, ``part``, ``seq``, ``h``: see Chain.head_info); a sink that fails
        counts it in its own stats."""
        if self.integrity is None or not self.heads_to:
            return
        with self._head_lock:           # heads leave in the order they were made
            info = self.integrity.head_info()
            if info is None or info == self._head_sent:
                return
            self._head_sent = info
            self.heads_sent += 1
            marker = Marker("head", {"host": self.header.get("host", ""), **info})
            for sink in self.heads_to:
                try:
                    sink.write(marker)
                    sink.flush()
                except Exception as exc:
                    self.log.error("chain head not sent", sink=sink.name, error=str(exc))

    def flush(self) -> None:
        """End of a batch: the buffer goes out on the writer's own schedule."""

    def sync(self) -> None:
        """Write what is buffered now (the writer thread calls this; tests may too)."""
        with self._lock:
            batch, self._buf, self._buf_bytes = self._buf, [], 0
        if not batch:
            return
        with self._write_lock:
            self._store(batch)

    def _write_prefix(self, records: list[bytes]) -> int:
        """Write as many leading whole records as the disk takes; how many.  A full
        disk ends the prefix (remembered in ``_full``); other errors are raised."""
        try:
            self._write_all(records)
            return len(records)
        except OSError as exc:
            if not (isinstance(exc, DiskFull) or exc.errno in DISK_FULL_ERRNOS):
                raise
            self._full = exc
            if len(records) == 1:
                return 0
        half = len(records) // 2
        done = self._write_prefix(records[:half])
        if done < half:
            return done
        return done + self._write_prefix(records[half:])

    def _store(self, batch: list[bytes]) -> None:
        """Write a batch: what fits is written, the rest is dropped and counted (and
        then the disk-full action is carried out)."""
        if self.stopped:
            self.records_dropped += len(batch)
            return
        while True:
            self._full = None
            gap: list[bytes] = []
            try:
                if self.rotate_size and self._size + sum(map(len, batch)) > self.rotate_size \
                        and self._size > 0:
                    self._rotate_files()
                gap = self._gap_record()
                written = self._write_prefix(gap + batch)
                error: OSError | None = self._full
            except OSError as exc:
                written, error = 0, exc
            self.records_written += written
            if gap and written:
                self._gap_noted = self._gap_pending
            batch = batch[max(0, written - len(gap)):]
            if error is None:
                if self.fsync == "flush":
                    os.fsync(self._fd)
                if self.last_error:
                    self.log.info("log writes work again", file=self.path)
                    self.last_error = None
                return
            full = isinstance(error, DiskFull) or error.errno in DISK_FULL_ERRNOS
            self.last_error = f"{error.strerror or error}"
            if full and self.disk_full == "drop-oldest" and self._drop_oldest():
                continue        # one rotated file fewer: try the rest again
            if full and self.disk_full == "stop":
                self.stopped = True
                self.stop_reason = f"log disk full: {self.last_error}"
            self.records_dropped += len(batch)
            self.log.error("LOG WRITE FAILED: records dropped" if not full else
                           "LOG DISK FULL: records dropped", file=self.path,
                           error=self.last_error, dropped=len(batch), written=written,
                           action=self.disk_full if full else "count")
            return

    def _gap_record(self) -> list[bytes]:
        """A "dropped" record written in front of the first batch stored after records
        were dropped, so that a reader sees where coverage has a gap."""
        total = self.records_dropped
        if total <= self._gap_noted:
            return []
        self._gap_pending = total
        return [self.encoder.encode_map({"t": "dropped", "time": time.time_ns(),
                                   "count": total - self._gap_noted, "total": total,
                                   "reason": self.last_error or "memory limit"})]

    def rotate(self) -> str | None:
        """Rotate now (SIGUSR1, ctl --rotate): flush, move files along, reopen."""
        self.sync()
        with self._write_lock:
            return self._rotate_files()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            buffered = self._buf_bytes
        return {"log_file": self.path, "records_written": self.records_written,
                "bytes_written": self.bytes_written, "records_dropped": self.records_dropped,
                "buffer_bytes": buffered, "buffer_fill": round(buffered / self.high_water, 3),
                "log_error": self.last_error, "log_stopped": self.stopped,
                **({"heads_sent": self.heads_sent} if self.heads_to else {})}

    def _write_last_word(self) -> None:
        """At the end, the log says what it could not store and, after the disk-full
        "stop", that it stopped: written now if the disk has room again (the space
        threshold does not apply to these last records)."""
        tail = self._gap_record()
        if self.stopped:
            tail.append(self.encoder.encode(Marker("stop", {
                "reason": self.stop_reason, "dropped": self.records_dropped})))
        if not tail:
            return
        try:
            self._write_all(tail, check_space=False)
            self.records_written += len(tail)
            self._gap_noted = self._gap_pending
        except OSError:
            pass

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
        self.sync()
        if self._fd >= 0:
            self._write_last_word()
            self._seal(final=True, reason="close")
            self._send_head()
            if self.fsync in ("flush", "rotate"):
                try:
                    os.fsync(self._fd)
                except OSError:
                    pass
            os.close(self._fd)
            self._fd = -1
        os.close(self._dir_fd)
        if self.integrity is not None:
            self.integrity.close()

    def _seal(self, final: bool, reason: str) -> None:
        """A seal record (integrity.py), when the log is chained; a failure is noted
        (the verifier will find the seal missing)."""
        if self.integrity is None or self._fd < 0:
            return
        try:
            self._write_all([self.integrity.seal(final, reason)], check_space=False)
            self.records_written += 1
        except OSError as exc:
            self.last_error = f"seal: {exc.strerror or exc}"
