"""Where the records of a search come from: the log files in time order, the files a
time range lets us skip without reading them, a streaming scan, and `--follow`.

A file is skipped when its time span cannot meet the range: it starts no earlier than
its first timed record and ends no later than its last one (read from the file's tail)
or, failing that, its modification time (a record is written after it happened).
SKEW covers events that reach the log out of order (a consumer running behind).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ..sinks.encode import as_text
from ..sinks.reader import MAX_RECORD, LogFormatError, rotated_files

SKEW = 120 * 1_000_000_000          # ns of slack on each side of a file's span
TAIL_BYTES = 256 * 1024
READ_SIZE = 1 << 20
HEAD_RECORDS = 64
CHUNK = 16 * 1024                   # bytes judged at once by the needle pre-check
PROGRESS_BYTES = 8 << 20
# records that are not events but count (lost and drop counts, file headers): a chunk
# holding one is always decoded
NOTE_NEEDLES = (b"\xa3hdr", b"\xa4lost", b"\xa7dropped")


def log_files(config_path: str | None) -> list[str]:
    """The daemon's log: every rotated file, oldest first, then the current one."""
    from ..service.config import load
    cfg = load(config_path)
    path = cfg.log_path
    if not os.path.isdir(cfg.log_dir):
        raise OSError(f"no log directory {cfg.log_dir} (give log files, or --config)")
    try:
        files = rotated_files(path)
    except PermissionError:
        raise OSError(f"cannot read the log directory {cfg.log_dir}: permission "
                      "denied (run as root)") from None
    return [f for f in files if os.path.exists(f)]


def _text(d: dict[str, Any]) -> dict[str, Any]:
    """Names stored as bin (not UTF-8) back to surrogateescape text; most records have
    none, and are handed on as they are."""
    for v in d.values():
        t = type(v)
        if t is bytes or t is dict:
            return as_text(d)
        if t is list:
            for x in v:
                if type(x) is not str:
                    return as_text(d)
    return d


def _unpacker(fh: Any = None) -> msgpack.Unpacker:
    return msgpack.Unpacker(fh, raw=False, strict_map_key=False, use_list=True,
                            max_buffer_size=MAX_RECORD, read_size=READ_SIZE)


def _first_time(path: str) -> int | None:
    """Time of the first timed record (the header's records follow it)."""
    with open(path, "rb") as fh:
        up = _unpacker(fh)
        try:
            for n, obj in enumerate(up):
                if n > HEAD_RECORDS:
                    break
                if isinstance(obj, dict) and obj.get("t") != "hdr":
                    t = obj.get("time")
                    if isinstance(t, int) and t > 0:
                        return t
        except Exception:
            return None
    return None


def _last_time(path: str, size: int) -> int | None:
    """Time of the last timed record, from the file's tail: a candidate record start
    counts only when everything from it to the end parses as log records."""
    with open(path, "rb") as fh:
        start = max(0, size - TAIL_BYTES)
        fh.seek(start)
        tail = fh.read()
    pos = len(tail)
    tried = 0
    while tried < 256:
        pos = tail.rfind(b"\xa1t", 0, pos)
        if pos <= 0:
            return None
        lead = tail[pos - 1]
        cand = pos - 1 if 0x80 <= lead <= 0x8F else pos - 3 if (
            pos >= 3 and tail[pos - 3] == 0xDE) else -1
        tried += 1
        if cand < 0:
            continue
        up = _unpacker()
        up.feed(tail[cand:])
        best = None
        ok = True
        try:
            for obj in up:
                if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
                    ok = False
                    break
                t = obj.get("time")
                if isinstance(t, int) and t > 0:
                    best = t if best is None else max(best, t)
        except Exception:
            ok = False
        if ok and best is not None:
            return best
    return None


@dataclass
class FileSpan:
    path: str
    size: int
    first: int | None
    last: int | None

    def outside(self, since: int | None, until: int | None) -> bool:
        if since is not None and self.last is not None and self.last + SKEW < since:
            return True
        if until is not None and self.first is not None and self.first - SKEW > until:
            return True
        return False


def file_span(path: str) -> FileSpan:
    st = os.stat(path)
    first = _first_time(path)
    last = _last_time(path, st.st_size)
    if last is None:
        last = st.st_mtime_ns
    return FileSpan(path, st.st_size, first, last)


@dataclass
class ScanStats:
    files: int = 0
    files_skipped: int = 0
    records: int = 0            # records read (every kind)
    events: int = 0             # event records decoded (not those stepped over)
    matched: int = 0
    bytes: int = 0
    torn: list[str] = field(default_factory=list)
    lost: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    seconds: float = 0.0
    stream: str | None = None   # read from a NATS stream (the fleet's), not files


class Scanner:
    """Streams the event maps of files that a time range and a predicate select.

    ``progress(done_bytes)`` is called every PROGRESS_BYTES.  Damage raises
    LogFormatError after every whole record before it was given out; a torn last
    record is noted in ``stats.torn``.
    """

    def __init__(self, predicate: Callable[[dict[str, Any]], bool],
                 since: int | None = None, until: int | None = None,
                 progress: Callable[[int], None] | None = None,
                 needles: tuple[bytes, ...] = ()) -> None:
        self.predicate = predicate
        self.needles = needles
        self.since = since
        self.until = until
        self.progress = progress
        self.stats = ScanStats()
        self._lost_runs: dict[Any, dict[str, int]] = {}
        self._run: Any = None
        self.last_end: tuple[int, int] = (0, 0)     # (inode, end of the last whole record)

    def plan(self, files: list[str]) -> list[FileSpan]:
        """The files to read: those whose span meets the time range."""
        spans = [file_span(f) for f in files]
        if self.since is None and self.until is None:
            return spans
        keep = [s for s in spans if not s.outside(self.since, self.until)]
        self.stats.files_skipped += len(spans) - len(keep)
        return keep

    def _note(self, obj: dict[str, Any]) -> None:
        """Records that are not events: the lost counters of each run, drops."""
        kind = obj.get("t")
        if kind == "hdr":
            self._run = (obj.get("boot_id"), obj.get("start"))
        elif kind == "lost":
            counts = obj.get("counts")
            if isinstance(counts, dict):
                run = self._lost_runs.setdefault(self._run, {})
                for k, v in counts.items():
                    if isinstance(v, int):
                        run[str(k)] = max(run.get(str(k), 0), v)
                total: dict[str, int] = {}
                for r in self._lost_runs.values():
                    for k, v in r.items():
                        total[k] = total.get(k, 0) + v
                self.stats.lost = total
        elif kind == "dropped":
            c = obj.get("count")
            if isinstance(c, int):
                self.stats.dropped += c

    def scan_stream(self, items: Iterable[Any], name: str) -> Iterator[dict[str, Any]]:
        """Matching event maps of a fleet's stream (``nats_reader.StreamRecord``s, every
        host's records in the stream's order), each with its ``host``; lost and drop
        counts are summed per host and run as for files."""
        st = self.stats
        st.stream = name
        since = self.since if self.since is not None else -1
        until = self.until if self.until is not None else 1 << 64
        pred = self.predicate
        t0 = time.perf_counter()
        try:
            for item in items:
                obj = item.record
                st.records += 1
                if obj.get("t") != "ev":
                    self._run = (item.msg_id or "").rpartition(":")[0] or item.host
                    self._note(obj)
                    continue
                st.events += 1
                try:
                    hit = since <= obj.get("time", 0) <= until and pred(obj)
                except TypeError:
                    raise LogFormatError(f"{name}: message {item.seq}: a record holds a "
                                         "value of the wrong type") from None
                if hit:
                    st.matched += 1
                    out = _text(obj)
                    out["host"] = item.host
                    yield out
        finally:
            st.seconds += time.perf_counter() - t0

    def scan(self, files: list[str], base: int = 0) -> Iterator[dict[str, Any]]:
        """Matching event maps (names as text) of every file in turn."""
        t0 = time.perf_counter()
        try:
            for path in files:
                yield from self._scan_file(path, base)
                base += os.path.getsize(path)
        finally:
            self.stats.seconds += time.perf_counter() - t0

    def _scan_file(self, path: str, base: int) -> Iterator[dict[str, Any]]:
        """Read the file in chunks.  With ``needles`` (byte strings one of which every
        matching event must contain), a chunk where none occurs is stepped over record
        by record with msgpack's ``skip`` (no objects built, several times faster);
        the records of the other chunks are decoded and judged."""
        st = self.stats
        since = self.since if self.since is not None else -1
        until = self.until if self.until is not None else 1 << 64
        pred = self.predicate
        progress = self.progress
        needles = self.needles + NOTE_NEEDLES if self.needles else ()
        records = events = matched = 0
        next_progress = PROGRESS_BYTES
        region_start = whole = 0
        tail = b""
        first = True
        with open(path, "rb") as fh:
            while True:
                chunk = fh.read(CHUNK)
                if not chunk:
                    break
                region = tail + chunk if tail else chunk
                up = _unpacker()        # one per region: skip and unpack do not mix
                up.feed(region)
                tell = up.tell          # offsets in the region
                if needles and not first and not any(n in region for n in needles):
                    skip = up.skip
                    while True:
                        try:
                            skip()
                        except msgpack.OutOfData:
                            break
                        except Exception as exc:
                            raise LogFormatError(f"{path}: damaged at byte {whole}: not a "
                                                 f"log record ({exc})") from None
                        whole = region_start + tell()
                        records += 1
                else:
                    while True:
                        try:
                            obj = up.unpack()
                        except msgpack.OutOfData:
                            break
                        except Exception as exc:
                            raise LogFormatError(f"{path}: damaged at byte {whole}: not a "
                                                 f"log record ({exc})") from None
                        whole = region_start + tell()
                        records += 1
                        if type(obj) is not dict:
                            raise LogFormatError(f"{path}: damaged before byte {whole}: "
                                                 "not a log record")
                        kind = obj.get("t")
                        if first:
                            if kind != "hdr":
                                raise LogFormatError(f"{path}: damaged at byte 0: the file "
                                                     "does not begin with a log header")
                            first = False
                        if kind == "ev":
                            events += 1
                            t = obj.get("time", 0)
                            try:
                                hit = since <= t <= until and pred(obj)
                            except TypeError:
                                raise LogFormatError(
                                    f"{path}: damaged before byte {whole}: a record holds "
                                    "a value of the wrong type") from None
                            if hit:
                                matched += 1
                                yield _text(obj)
                        else:
                            self._note(obj)
                tail = region[whole - region_start:]
                region_start = whole
                if progress is not None and whole >= next_progress:
                    progress(base + whole)
                    next_progress = whole + PROGRESS_BYTES
            size = fh.tell()
            self.last_end = (os.fstat(fh.fileno()).st_ino, whole)
        st.files += 1
        st.records += records
        st.events += events
        st.matched += matched
        st.bytes += size
        if first and size == 0:
            raise LogFormatError(f"{path}: empty file, not a log (no header)")
        if size - whole:
            st.torn.append(path)


class Follower:
    """`--follow`: read what is appended to the log, and go on with the new file after
    a rotation (the renamed file is read to its end first), like ``tail -F``."""

    def __init__(self, path: str, scanner: Scanner, interval: float = 0.2) -> None:
        self.path = path
        self.scanner = scanner
        self.interval = interval
        self.stopped = False

    def _open(self, path: str, offset: int) -> tuple[Any, os.stat_result] | None:
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            return None
        st = os.fstat(fh.fileno())
        fh.seek(min(offset, st.st_size))
        return fh, st

    def follow(self, start: tuple[int, int] = (0, 0)) -> Iterator[dict[str, Any]]:
        """Matching event maps from ``start`` (inode, offset: where the scan of the
        current file ended) on, until stopped.  Yields ``{}`` when idle."""
        ino0, offset = start
        opened = None
        while opened is None and not self.stopped:
            opened = self._open(self.path, offset)
            if opened is not None and opened[1].st_ino != ino0:
                # rotated since the scan: finish the file the scan read first
                older = self._open(self.path + ".1", offset)
                if older is not None and older[1].st_ino == ino0:
                    opened[0].close()
                    opened = older
                else:
                    if older is not None:
                        older[0].close()
                    opened[0].seek(0)
            if opened is None:
                time.sleep(self.interval)
        if opened is None:
            return
        fh, st = opened
        ino = (st.st_dev, st.st_ino)
        up = _unpacker()
        drained = False
        sc = self.scanner
        since = sc.since if sc.since is not None else -1
        until = sc.until if sc.until is not None else 1 << 64
        try:
            while not self.stopped:
                chunk = fh.read(READ_SIZE)
                if chunk:
                    up.feed(chunk)
                    for obj in up:
                        sc.stats.records += 1
                        if type(obj) is not dict:
                            raise LogFormatError(f"{self.path}: not a log record")
                        if obj.get("t") == "ev":
                            sc.stats.events += 1
                            if since <= obj.get("time", 0) <= until and sc.predicate(obj):
                                sc.stats.matched += 1
                                yield _text(obj)
                        else:
                            sc._note(obj)
                    continue
                # at the end of what was written: has the file been rotated away?
                try:
                    now = os.stat(self.path)
                    moved = (now.st_dev, now.st_ino) != ino
                except FileNotFoundError:
                    moved = False       # between the rename and the new file: wait
                if moved and not drained:
                    drained = True      # read once more: the last write before the rename
                    continue
                if moved:
                    drained = False
                    fh.close()
                    opened = self._open(self.path, 0)
                    if opened is None:
                        continue
                    fh, st = opened
                    ino = (st.st_dev, st.st_ino)
                    up = _unpacker()
                    continue
                yield {}                # idle: lets the caller flush and check signals
                time.sleep(self.interval)
        finally:
            fh.close()
