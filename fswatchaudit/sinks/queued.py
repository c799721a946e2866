"""A sink that never holds up auditing: records wait in a bounded queue of their own
and a thread of their own hands them to a transport that may be slow, full or dead.

The transport (syslog, journald, a network service) raises when it cannot take a
record; the record then stays first in the queue and the thread tries again after a
back-off that doubles up to a limit.  When the queue is full, new records are counted
as lost, never waited for.

Records move in batches, as the consumer reads them: ``write_many`` queues a batch
under one lock and wakes the thread once, and a transport with ``write_many`` is
handed up to ``BATCH`` queued records at a time (formatted together, sent with as few
system calls as its protocol allows); one that took only the first few raises
``PartlySent`` saying how many, so that each record is counted sent once and the rest
stay queued.  Handing records on one by one cost more in thread switches and locks
than in sending them.
"""
from __future__ import annotations

import collections
import itertools
import threading
import time
from typing import Any

from .. import diag
from ..events import Record
from .base import Sink

DEFAULT_QUEUE = 100_000          # records
BACKOFF_FIRST = 0.1              # seconds
BACKOFF_MAX = 30.0
CLOSE_WAIT = 5.0                 # seconds close() waits for the queue to drain ...
CLOSE_MAX = 60.0                 # ... or longer while records still go out, up to this
BATCH = 512                      # records handed to a transport's write_many at most


class PartlySent(Exception):
    """A transport's ``write_many`` took the first ``done`` records of the batch (at
    least one), then failed with ``cause``."""

    def __init__(self, done: int, cause: Exception) -> None:
        super().__init__(str(cause))
        self.done = done
        self.cause = cause


class QueuedSink:
    def __init__(self, transport: Sink, max_records: int = DEFAULT_QUEUE,
                 backoff_max: float = BACKOFF_MAX) -> None:
        self.transport = transport
        self.name = transport.name
        self.max_records = max_records
        self.backoff_max = backoff_max
        self._queue: collections.deque[Record] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._abandoned = False         # close() gave up: what is left is counted lost
        self.sent = 0
        self.lost = 0
        self.errors = 0
        self.last_error: str | None = None
        self.retry_at = 0.0
        self.log = diag.get_logger(f"sink.{self.name}")
        self._thread = threading.Thread(target=self._run, name=f"sink-{self.name}",
                                        daemon=True)
        self._thread.start()

    def write(self, record: Record) -> None:
        with self._cond:
            if len(self._queue) >= self.max_records:
                self.lost += 1
                return
            self._queue.append(record)
            if len(self._queue) == 1:
                self._cond.notify()

    def write_many(self, records: list[Record]) -> None:
        """A batch: queued under one lock; what does not fit is counted as lost."""
        with self._cond:
            room = self.max_records - len(self._queue)
            if room < len(records):
                self.lost += len(records) - max(room, 0)
                records = records[:max(room, 0)]
            if records:
                wake = not self._queue
                self._queue.extend(records)
                if wake:
                    self._cond.notify()

    def flush(self) -> None:
        """The thread hands records on as they come: nothing to do here."""

    def _send(self, batch: list[Record]) -> tuple[int, Exception | None]:
        """Hand a batch to the transport: how many it took, and its failure."""
        try:
            if len(batch) == 1:
                self.transport.write(batch[0])
            else:
                self.transport.write_many(batch)      # type: ignore[attr-defined]
            return len(batch), None
        except PartlySent as part:
            return part.done, part.cause
        except Exception as exc:
            return 0, exc

    def _run(self) -> None:
        backoff = BACKOFF_FIRST
        batch_max = BATCH if hasattr(self.transport, "write_many") else 1
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = list(itertools.islice(self._queue, batch_max))
            done, exc = self._send(batch)
            if done:
                with self._cond:
                    if self._abandoned:
                        return
                    for _ in range(done):
                        self._queue.popleft()
                    self.sent += done
                    drained = not self._queue
                if drained and exc is None:
                    try:
                        self.transport.flush()
                    except Exception as flush_exc:
                        self.last_error = str(flush_exc)
            if exc is not None:
                self.errors += 1
                if self.last_error is None:
                    self.log.error("SINK FAILING: records wait in its queue",
                                   error=str(exc), queued=len(self._queue))
                self.last_error = str(exc)
                self.retry_at = time.monotonic() + backoff
                with self._cond:
                    if self._closing:
                        return          # close() counts what is left
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max)
                continue
            if self.last_error is not None:
                self.log.info("sink works again", sent=self.sent)
                self.last_error = None
            backoff = BACKOFF_FIRST

    def close(self) -> None:
        """Hand on what is queued while the transport works (as long as records keep
        going out, up to CLOSE_MAX seconds; CLOSE_WAIT without progress), count the
        rest as lost, close the transport."""
        start = time.monotonic()
        deadline = start + CLOSE_WAIT
        sent = self.sent
        while time.monotonic() < min(deadline, start + CLOSE_MAX):
            with self._cond:
                if not self._queue or self.last_error is not None:
                    break
            if self.sent != sent:           # progress: wait on
                sent = self.sent
                deadline = time.monotonic() + CLOSE_WAIT
            time.sleep(0.01)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(CLOSE_WAIT)
        with self._cond:
            self._abandoned = True          # a thread still writing stops after it
            self.lost += len(self._queue)
            self._queue.clear()
        self.transport.close()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            queued = len(self._queue)
        out: dict[str, Any] = {"sent": self.sent, "queued": queued, "lost": self.lost,
                               "queue_limit": self.max_records}
        if self.errors:
            out["errors"] = self.errors
            out["last_error"] = self.last_error
        return out
