"""The one small protocol every output implements, and the fan-out that feeds them.

Records come from one stream (the Auditor); an encoder turns a record into bytes and a
sink decides where the bytes go, as structlog separates renderers from its loggers.
A sink that fails never stops the stream or the other sinks: its failures are counted
in its own stats.  Where several sinks store the same encoding of a record (the msgpack
log and NATS both send the one serialised form as msgpack), the fan-out encodes each
record of a batch once and hands the bytes to each (``write_encoded``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ..events import Record
from .encode import MsgpackEncoder

# encodings the fan-out makes once per batch for every sink that wants them
SHARED_ENCODERS: dict[str, Callable[[], Any]] = {"msgpack": MsgpackEncoder}


class Sink(Protocol):
    """Where records go.  ``write`` must not block on slow I/O for long; ``flush`` is
    called after each batch the consumer read (cheap: a sink with its own schedule, as
    the file sink's once a second, may leave the batch to it); ``close`` hands on
    everything still held; ``stats`` are counters for status and summaries.  A sink
    may also take a batch in one call, ``write_many(records)``, which either takes
    them all or raises before taking any; and one whose ``encoding`` names a kind of
    ``SHARED_ENCODERS`` takes a batch with its records already encoded so,
    ``write_encoded(records, payloads)``, the same way."""

    name: str

    def write(self, record: Record) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


class Fanout:
    """Hands each record to every sink; a sink that raises is counted, not fatal."""

    def __init__(self, sinks: list[Sink], on_error: Any = None) -> None:
        self.sinks = list(sinks)
        self.errors: dict[str, int] = {}
        self.on_error = on_error            # called (sink, exc, count) on failures
        wanted: dict[str, int] = {}
        for sink in self.sinks:
            kind = getattr(sink, "encoding", None)
            if kind in SHARED_ENCODERS and hasattr(sink, "write_encoded"):
                wanted[kind] = wanted.get(kind, 0) + 1
        # an encoding shared by two sinks or more, with the fan-out's own encoder
        self._shared = {kind: SHARED_ENCODERS[kind]() for kind, n in wanted.items()
                        if n > 1}

    def _failed(self, sink: Sink, exc: Exception) -> None:
        count = self.errors[sink.name] = self.errors.get(sink.name, 0) + 1
        if self.on_error is not None:
            self.on_error(sink, exc, count)

    def _each(self, call: Callable[[Sink], None]) -> None:
        for sink in self.sinks:
            try:
                call(sink)
            except Exception as exc:
                self._failed(sink, exc)

    def write(self, record: Record) -> None:
        self._each(lambda sink: sink.write(record))

    def write_many(self, records: list[Record]) -> None:
        """A batch to every sink: in one call where the sink takes batches
        (``write_many``), else record by record.  A batch that fails is written again
        record by record, so that what failed is counted per record."""
        encoded: dict[str, list[bytes]] = {}
        for kind, encoder in self._shared.items():
            try:
                encode = encoder.encode
                encoded[kind] = [encode(r) for r in records]
            except Exception:           # noqa: BLE001 - each sink then encodes its own
                pass
        for sink in self.sinks:
            payloads = encoded.get(getattr(sink, "encoding", None) or "")
            many = getattr(sink, "write_many", None)
            try:
                if payloads is not None:
                    sink.write_encoded(records, payloads)   # type: ignore[attr-defined]
                    continue
                if many is not None:
                    many(records)
                    continue
            except Exception:           # noqa: BLE001 - counted below, per record
                pass
            for record in records:
                try:
                    sink.write(record)
                except Exception as exc:
                    self._failed(sink, exc)

    def flush(self) -> None:
        self._each(lambda sink: sink.flush())

    def close(self) -> None:
        self._each(lambda sink: sink.close())

    def stats(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for sink in self.sinks:
            st = dict(sink.stats())
            if self.errors.get(sink.name):
                st["write_errors"] = self.errors[sink.name]
            out[sink.name] = st
        return out
