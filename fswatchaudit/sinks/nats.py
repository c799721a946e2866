"""The NATS JetStream sink: every record of the stream, in its one serialised form
(msgpack), published to a fleet's JetStream stream, never holding up the event path.

Subjects.  ``<prefix>.<host>.<key>``: ``prefix`` defaults to ``fswatchaudit``; ``key``
is the first key of an event's rules (every key stays in the record), ``_`` for events
without a key and for the other records (lost counts, rules, marks, process states).
A host or key becomes a subject token by ``subject_token``: the bytes ``A-Z a-z 0-9 -
_`` stay as they are, every other byte (``.``, ``*``, ``>``, ``%``, blanks, control and
non-ASCII bytes, raw bytes of a name that is not UTF-8) is written ``%XX`` (upper-case
hex), and a value that is exactly ``_`` is written ``%5F`` so that it cannot be taken
for "no key".  ``token_text`` reverses it.

Messages.  A message holds one record or several consecutive records of one subject
(at most ``bundle`` records and ``BUNDLE_BYTES`` bytes): its payload is their msgpack
maps one after the other, as in the log file.  A message per record would cost the
publisher (nats-py) and the server each some tens of microseconds a record, more than
everything else the record costs; bundling a run of one subject keeps the order of
the records and their subjects, and a reader unpacks every map of a payload
(``nats_reader``).  ``bundle = 1`` publishes a message per record.

Message ids.  Each message carries ``Nats-Msg-Id: <host>:<boot id>:<run start>:<n>``
where ``n`` counts the records this sink was given (1, 2, ...) and is that of the
message's first record (the record ``i`` places after it has ``n + i``).  A message
is made once, when it leaves the queue, and goes to the spool as it is, so a message
published again after a lost acknowledgement has the same id and records, and
JetStream, which drops a message whose id it has seen within the stream's
``duplicate_window``, does not store it twice.

Flow.  ``write`` encodes the record and appends it to a bounded in-memory queue; that
is all the event path pays.  A thread of its own (an asyncio loop with nats-py)
publishes batches of messages and waits for their acknowledgements.  While the
servers cannot be reached, or refuse, the queue goes to the spool file on disk
(``Spool``), and the thread tries again with exponential back-off; once a server
answers, the spool is published first, oldest record first, then the queue: records
reach the stream in the order they were written.  A record leaves the spool only
after JetStream has acknowledged it.  Counted in ``stats``, in records: ``sent``
(acknowledged), ``spooled`` (put in the spool), ``lost`` (the queue or the spool was
full: never silent), ``duplicates`` (acknowledged as already stored), ``errors`` and
``last_error``.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import os
import struct
import threading
import time
from typing import Any

from .. import diag
from ..events import Event, Record
from ..privdir import open_private_dir
from .encode import Encoder, MsgpackEncoder

DEFAULT_PREFIX = "fswatchaudit"
DEFAULT_STREAM = "FSWATCHAUDIT"
DEFAULT_BUNDLE = 256             # records a message holds at most (kinds.py too)
BUNDLE_BYTES = 256 << 10         # payload bytes a bundle reaches at most (a record
#                                  larger than this goes alone); the server's default
#                                  max_payload is 1 MiB
NO_KEY = "_"
_TOKEN_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def subject_token(value: str | None) -> str:
    """One subject token for a host or a key (see the module text); None or empty: _."""
    if not value:
        return NO_KEY
    if value == NO_KEY:
        return "%5F"
    raw = value.encode("utf-8", "surrogateescape")
    return "".join(chr(b) if b in _TOKEN_SAFE else f"%{b:02X}" for b in raw)


def token_text(token: str) -> str | None:
    """The host or key a subject token stands for (None for _)."""
    if token == NO_KEY:
        return None
    out = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "%" and i + 3 <= len(token):
            out.append(int(token[i + 1:i + 3], 16))
            i += 3
        else:
            out += token[i].encode()
            i += 1
    return out.decode("utf-8", "surrogateescape")


def record_subject(prefix: str, host: str, record: Record) -> str:
    key = record.keys[0] if isinstance(record, Event) and record.keys else None
    return f"{prefix}.{subject_token(host)}.{subject_token(key)}"


# -- the spool --------------------------------------------------------------------

# A message as published and spooled: (Nats-Msg-Id, subject, payload, records in it).
Message = tuple[str, str, bytes, int]

_POS = struct.Struct(">Q")
_LEN = struct.Struct(">I")
MAX_FRAME = 16 << 20


class Spool:
    """Records waiting for the server, oldest first, in one file per sink:
    ``<dir>/<name>.spool``, created 0600 and never through a symlink.  Its first 8
    bytes are the offset of the first message not yet acknowledged; then frames (4-byte
    big-endian length + msgpack ``[msg_id, subject, payload, records]``; a frame
    without ``records`` holds one).  A torn last frame
    (a crash in the middle of an append) is cut off when the file is opened.  The
    file is at most ``limit`` bytes; when the acknowledged head is cut away the rest
    is copied to a new file renamed over it, so a crash leaves one whole spool."""

    def __init__(self, directory: str, name: str, limit: int) -> None:
        import msgpack
        self._msgpack = msgpack
        self.path = os.path.join(directory, f"{name}.spool")
        self.filename = f"{name}.spool"
        self.limit = limit
        self._dir_fd = open_private_dir(directory)
        self._fd = self._open(self.filename, os.O_CREAT)
        size = os.fstat(self._fd).st_size
        if size < _POS.size:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, _POS.pack(_POS.size), 0)
            size = _POS.size
        self.pos = _POS.unpack(os.pread(self._fd, _POS.size, 0))[0]
        if not _POS.size <= self.pos <= size:
            self.pos = _POS.size
        self.size = self._whole_frames(size)
        self.records = self._count(self.pos, self.size)

    def _open(self, filename: str, extra: int) -> int:
        from .rotating import unsafe_log_file
        fd = os.open(filename, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | extra, 0o600,
                     dir_fd=self._dir_fd)
        problem = unsafe_log_file(os.fstat(fd))
        if problem is not None:
            os.close(fd)
            raise OSError(errno.EPERM, f"refusing spool file {self.path}: {problem}")
        return fd

    def _frames(self, start: int, end: int):
        off = start
        while off + _LEN.size <= end:
            (n,) = _LEN.unpack(os.pread(self._fd, _LEN.size, off))
            if n > MAX_FRAME or off + _LEN.size + n > end:
                return
            yield off, off + _LEN.size + n
            off += _LEN.size + n

    def _whole_frames(self, size: int) -> int:
        end = self.pos
        for _, frame_end in self._frames(self.pos, size):
            end = frame_end
        if end != size:
            os.ftruncate(self._fd, end)
        return end

    def _count(self, start: int, end: int) -> int:
        """Records in the frames (a frame that cannot be read counts as one: reading
        it to publish it will say what is wrong)."""
        total = 0
        for frame_start, frame_end in self._frames(start, end):
            body = os.pread(self._fd, frame_end - frame_start - _LEN.size,
                            frame_start + _LEN.size)
            try:
                fields = self._msgpack.unpackb(body, raw=False)
                total += fields[3] if len(fields) > 3 and type(fields[3]) is int else 1
            except (ValueError, TypeError, IndexError):
                total += 1
        return total

    @property
    def pending(self) -> int:
        """Records in the spool not yet acknowledged."""
        return self.records

    def append(self, entries: list[Message]) -> int:
        """Store messages at the end, in order; how many fitted (the rest did not)."""
        frames = []
        for msg_id, subject, payload, count in entries:
            body = self._msgpack.packb([msg_id, subject, payload, count], use_bin_type=True)
            frames.append(_LEN.pack(len(body)) + body)
        need = sum(map(len, frames))
        if self.size + need > self.limit and self.pos > _POS.size:
            self._compact()
        fitted = 0
        room = self.limit - self.size
        for frame in frames:
            if len(frame) > room:
                break
            room -= len(frame)
            fitted += 1
        data = b"".join(frames[:fitted])
        if data:
            os.pwrite(self._fd, data, self.size)
            self.size += len(data)
            self.records += sum(e[3] for e in entries[:fitted])
        return fitted

    def read(self, max_records: int) -> tuple[list[Message], int]:
        """The oldest messages, as many as hold up to max_records records (at least
        one message), and the offset after them."""
        return self._read(self.pos, self.size, max_records)

    def _read(self, begin: int, stop: int,
              max_records: int | None = None) -> tuple[list[Message], int]:
        out: list[Message] = []
        end, records = begin, 0
        for start, frame_end in self._frames(begin, stop):
            body = os.pread(self._fd, frame_end - start - _LEN.size, start + _LEN.size)
            msg_id, subject, payload, *count = self._msgpack.unpackb(body, raw=False)
            n = count[0] if count else 1
            if out and max_records is not None and records + n > max_records:
                break
            out.append((msg_id, subject, payload, n))
            records += n
            end = frame_end
        return out, end

    def advance(self, end: int, count: int) -> None:
        """The messages before ``end``, holding ``count`` records, were acknowledged:
        forget them."""
        self.records -= count
        if end >= self.size:
            os.ftruncate(self._fd, _POS.size)
            self.size = end = _POS.size
        os.pwrite(self._fd, _POS.pack(end), 0)
        self.pos = end

    def _compact(self) -> None:
        tmp = self.filename + ".new"
        try:
            os.unlink(tmp, dir_fd=self._dir_fd)
        except FileNotFoundError:
            pass
        fd = self._open(tmp, os.O_CREAT | os.O_EXCL)
        try:
            os.pwrite(fd, _POS.pack(_POS.size), 0)
            off, dst = self.pos, _POS.size
            while off < self.size:
                chunk = os.pread(self._fd, min(1 << 20, self.size - off), off)
                os.pwrite(fd, chunk, dst)
                off += len(chunk)
                dst += len(chunk)
            os.fsync(fd)
            os.rename(tmp, self.filename, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except BaseException:
            os.close(fd)
            raise
        os.close(self._fd)
        self._fd, self.pos, self.size = fd, _POS.size, dst

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            os.close(self._dir_fd)
            self._fd = -1


def finish_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what the client library left running, then close the loop."""
    async def cancel_the_rest() -> None:
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    try:
        loop.run_until_complete(cancel_the_rest())
    finally:
        loop.close()


class _SafeLog:
    """The sink's diagnostics: a logger that fails (a closed stderr) never stops the
    publisher thread."""

    def __init__(self, log: Any) -> None:
        self._log = log

    def __getattr__(self, level: str) -> Any:
        def say(event: str, **kw: Any) -> None:
            try:
                getattr(self._log, level)(event, **kw)
            except Exception:
                pass
        return say


# -- the sink ---------------------------------------------------------------------

class NatsSink:
    """Publishes every record to NATS JetStream (see the module text).

    servers      NATS URLs (``nats://127.0.0.1:4222``), several for a cluster: each
                 is tried in turn
    host, boot_id, start
                 this host's name, boot id and the run's start (ns): the subject and
                 the message ids (``wiring.log_header`` has all three)
    spool_dir    directory of the spool (created 0700); the file is ``<name>.spool``
    spool_limit  bytes of spool at most (records beyond are counted as lost)
    queue_size   records waiting in memory at most (beyond: counted as lost)
    stream       the JetStream stream; ``create_stream`` adds it when missing, on
                 ``<prefix>.>``, with ``replicas`` and ``duplicate_window`` seconds
    batch        records published (in messages) before waiting for their
                 acknowledgements
    bundle       records a message holds at most (see the module text)
    ack_timeout  seconds to wait for a batch's acknowledgements
    backoff      (first, longest) seconds between two attempts after a failure
    close_timeout  seconds ``close`` spends handing records on (trying the servers
                 again meanwhile); what is left stays in the spool for the next start
    """

    def __init__(self, servers: str | list[str], host: str, boot_id: str, start: int,
                 spool_dir: str, name: str = "nats", prefix: str = DEFAULT_PREFIX,
                 stream: str = DEFAULT_STREAM, create_stream: bool = False,
                 replicas: int = 1, duplicate_window: float = 3600.0,
                 spool_limit: int = 256 << 20, queue_size: int = 100_000,
                 batch: int = 256, bundle: int = DEFAULT_BUNDLE, ack_timeout: float = 5.0,
                 backoff: tuple[float, float] = (0.2, 30.0), close_timeout: float = 10.0,
                 encoder: Encoder | None = None) -> None:
        self.name = name
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        if not self.servers:
            raise ValueError("no NATS server given")
        self.host, self.prefix, self.stream = host, prefix, stream
        self.create_stream, self.replicas = create_stream, replicas
        self.duplicate_window = duplicate_window
        self._id_prefix = f"{host}:{boot_id}:{start}:"
        self.encoder = encoder or MsgpackEncoder()
        self.queue_size, self.batch, self.bundle = queue_size, batch, max(1, bundle)
        self.ack_timeout, self.backoff, self.close_timeout = ack_timeout, backoff, close_timeout
        self.log = _SafeLog(diag.get_logger("nats"))
        self.spool = Spool(spool_dir, name, spool_limit)
        self._lock = threading.Lock()
        # records waiting: (n, subject, payload); messages are made when they leave
        self._queue: collections.deque[tuple[int, str, bytes]] = collections.deque()
        self._n = 0
        self.sent = self.spooled = self.lost = self.errors = self.duplicates = 0
        self.last_error: str | None = None
        self.connected_url: str | None = None
        self._stream_ready = False
        self._closing = threading.Event()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._wake: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._thread_main, name=f"fswatchaudit-{name}",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()

    # -- the event path ------------------------------------------------------------
    def write(self, record: Record) -> None:
        """Encode and queue: no network, no disk."""
        subject = record_subject(self.prefix, self.host, record)
        with self._lock:
            # the encoder's packer is not thread-safe, and the log writer's thread
            # writes chain heads here beside the consumer
            payload = self.encoder.encode(record)
            if self._closed:
                raise ValueError(f"sink {self.name} is closed")
            self._n += 1
            if len(self._queue) >= self.queue_size:
                self.lost += 1
                return
            self._queue.append((self._n, subject, payload))

    @property
    def encoding(self) -> str | None:
        """The shared encoding this sink sends (base.Fanout), None for its own."""
        return "msgpack" if type(self.encoder) is MsgpackEncoder else None

    def write_many(self, records: list[Record]) -> None:
        """A batch, encoded first (one that cannot be encoded raises before any is
        queued), then queued under one lock."""
        with self._lock:
            encode = self.encoder.encode
            payloads = [encode(r) for r in records]
        self.write_encoded(records, payloads)

    def write_encoded(self, records: list[Record], payloads: list[bytes]) -> None:
        """A batch already encoded with this sink's encoding, queued under one lock."""
        prefix, host = self.prefix, self.host
        subjects = [record_subject(prefix, host, r) for r in records]
        with self._lock:
            if self._closed:
                raise ValueError(f"sink {self.name} is closed")
            n, room = self._n, self.queue_size - len(self._queue)
            self._n += len(records)
            if room < len(records):
                self.lost += len(records) - max(room, 0)
            self._queue.extend((n + 1 + i, subjects[i], payloads[i])
                               for i in range(min(len(records), max(room, 0))))

    def flush(self) -> None:
        """End of a batch: wake the publisher (it also looks by itself regularly)."""
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:        # the loop has just ended
                pass

    def stats(self) -> dict[str, Any]:
        with self._lock:
            queued = len(self._queue)
        return {"sent": self.sent, "spooled": self.spooled, "lost": self.lost,
                "errors": self.errors, "last_error": self.last_error,
                "duplicates": self.duplicates, "queued": queued,
                "spool_records": self.spool.pending,
                "spool_bytes": self.spool.size - self.spool.pos,
                "spool_limit": self.spool.limit, "queue_limit": self.queue_size,
                "connected": self.connected_url}

    def close(self) -> None:
        """Hand on what is queued (for at most close_timeout seconds; what the server
        has not taken stays in the spool) and stop the thread.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._closing.set()
        self._poke()
        self._thread.join(self.close_timeout + self.ack_timeout + 5)
        if self._thread.is_alive():         # stuck in a library call: keep what we can
            self.log.error("nats sink did not stop in time", sink=self.name)
            return
        self._spill()
        self.spool.sync()
        self.spool.close()

    # -- the publisher thread ------------------------------------------------------
    def _thread_main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except Exception as exc:        # never silent: counted, and the queue kept
            self.errors += 1
            self.last_error = f"publisher stopped: {type(exc).__name__}: {exc}"
            try:
                self._spill()
            except Exception:
                pass
        finally:
            finish_loop(self._loop)

    def _take(self, n: int | None) -> list[Message]:
        """Up to n records (None: all) from the queue, as messages."""
        with self._lock:
            q = self._queue
            count = len(q) if n is None else min(n, len(q))
            taken = [q.popleft() for _ in range(count)]
        return self._bundle(taken)

    def _bundle(self, taken: list[tuple[int, str, bytes]]) -> list[Message]:
        """Records to messages: each run of one subject in bundles (see the module)."""
        out: list[Message] = []
        prefix, limit = self._id_prefix, self.bundle
        i, end = 0, len(taken)
        while i < end:
            first, subject, payload = taken[i]
            parts, size = [payload], len(payload)
            i += 1
            while i < end and len(parts) < limit and taken[i][1] == subject \
                    and size + len(taken[i][2]) <= BUNDLE_BYTES:
                parts.append(taken[i][2])
                size += len(taken[i][2])
                i += 1
            out.append((prefix + str(first), subject,
                        parts[0] if len(parts) == 1 else b"".join(parts), len(parts)))
        return out

    def _spill(self, entries: list[Message] | None = None) -> None:
        """Messages (or the whole queue) to the end of the spool; the records of what
        does not fit are lost and counted."""
        if entries is None:
            entries = self._take(None)
        if not entries:
            return
        try:
            fitted = self.spool.append(entries)
        except OSError as exc:
            fitted = 0
            self._failed(f"spool: {exc}")
        self.spooled += sum(e[3] for e in entries[:fitted])
        if fitted < len(entries):
            lost = sum(e[3] for e in entries[fitted:])
            with self._lock:                # write() counts its losses too
                self.lost += lost
            self.log.error("nats spool full: records lost", sink=self.name, lost=lost)

    def _failed(self, what: str) -> None:
        self.errors += 1
        if what != self.last_error:
            self.log.warning("nats sink: " + what, sink=self.name)
        self.last_error = what

    async def _main(self) -> None:
        self._wake = asyncio.Event()
        self._ready.set()
        nc: Any = None
        delay = self.backoff[0]
        retry_at = 0.0
        deadline: float | None = None
        server = 0
        while True:
            if self._closing.is_set() and deadline is None:
                deadline = time.monotonic() + self.close_timeout
            if deadline is not None and time.monotonic() > deadline:
                break
            if nc is None and time.monotonic() >= retry_at:
                url = self.servers[server % len(self.servers)]
                server += 1
                nc = await self._connect(url)
                if nc is None:
                    if server % len(self.servers) == 0:
                        retry_at = time.monotonic() + delay
                        delay = min(delay * 2, self.backoff[1])
                    continue
            if nc is None:
                self._spill()               # safe on disk while there is no server
                await self._sleep(min(0.25, max(0.0, retry_at - time.monotonic())))
                continue
            js = nc.jetstream()
            if self.spool.pending:
                self._spill()               # newer records queue up behind the spooled
                entries, end = self.spool.read(self.batch)
                if await self._publish(js, entries):
                    self.spool.advance(end, sum(e[3] for e in entries))
                    delay = self.backoff[0]
                    continue
            else:
                entries = self._take(self.batch)
                if entries:
                    if await self._publish(js, entries):
                        delay = self.backoff[0]
                        continue
                    self._spill(entries)
                    self._spill()
                elif deadline is not None:
                    break
                else:
                    await self._sleep(0.2)
                    continue
            # a publication failed: drop the connection, wait, try the next server
            await self._disconnect(nc)
            nc = None
            retry_at = time.monotonic() + delay
            delay = min(delay * 2, self.backoff[1])
        if nc is not None:
            await self._disconnect(nc)
        self._spill()

    async def _sleep(self, seconds: float) -> None:
        assert self._wake is not None
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass
        self._wake.clear()

    async def _connect(self, url: str) -> Any:
        import nats
        import nats.js.errors
        try:
            nc = await nats.connect(servers=[url], allow_reconnect=False,
                                    connect_timeout=2, max_reconnect_attempts=1,
                                    reconnect_time_wait=0.05,
                                    error_cb=self._quiet, disconnected_cb=self._nothing,
                                    closed_cb=self._nothing)
        except Exception as exc:
            self._failed(f"cannot connect to {url}: {type(exc).__name__}: {exc}")
            return None
        if self.create_stream and not self._stream_ready:
            js = nc.jetstream(timeout=self.ack_timeout)
            try:
                await js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                try:
                    await js.add_stream(name=self.stream, subjects=[f"{self.prefix}.>"],
                                        num_replicas=self.replicas,
                                        duplicate_window=self.duplicate_window)
                except Exception as exc:
                    self._failed(f"cannot add stream {self.stream}: {exc}")
                    await self._disconnect(nc)
                    return None
            except Exception as exc:
                self._failed(f"stream {self.stream}: {type(exc).__name__}: {exc}")
                await self._disconnect(nc)
                return None
        self._stream_ready = True
        if self.connected_url != url:
            self.log.info("nats sink connected", sink=self.name, url=url)
        self.connected_url = url
        return nc

    async def _quiet(self, exc: Exception) -> None:
        pass

    async def _nothing(self) -> None:
        pass

    async def _disconnect(self, nc: Any) -> None:
        self.connected_url = None
        try:
            await asyncio.wait_for(nc.close(), 2)
        except Exception:
            pass

    async def _publish(self, js: Any, entries: list[Message]) -> bool:
        """Publish a batch of messages and wait for every acknowledgement; False on
        any failure (the caller keeps the whole batch: what was stored comes back as
        duplicate)."""
        futures: list[asyncio.Future] = []
        try:
            for msg_id, subject, payload, _ in entries:
                futures.append(await js.publish_async(
                    subject, payload, headers={"Nats-Msg-Id": msg_id},
                    wait_stall=self.ack_timeout))
            acks = await asyncio.wait_for(asyncio.gather(*futures), self.ack_timeout)
        except Exception as exc:
            for fut in futures:
                fut.cancel()
            self._failed(f"publish: {type(exc).__name__}: {exc}".rstrip(": "))
            return False
        # a batch published again: what had been stored is acknowledged as a duplicate
        self.duplicates += sum(e[3] for e, ack in zip(entries, acks, strict=True)
                               if ack.duplicate)
        self.sent += sum(e[3] for e in entries)
        if self.last_error is not None:
            self.log.info("nats sink publishes again", sink=self.name)
            self.last_error = None
        return True
