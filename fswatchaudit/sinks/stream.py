"""A sink that writes encoded records to a byte stream (stdout for trace)."""
from __future__ import annotations

from typing import Any, BinaryIO

from ..events import Record
from .encode import Encoder


class StreamSink:
    """Encoded records to a stream, handed on after each batch the consumer read."""

    def __init__(self, stream: BinaryIO, encoder: Encoder, name: str = "stdout") -> None:
        self.stream = stream
        self.encoder = encoder
        self.name = name
        self.records = 0

    def write(self, record: Record) -> None:
        self.stream.write(self.encoder.encode(record))
        self.records += 1

    def write_many(self, records: list[Record]) -> None:
        encode = self.encoder.encode
        data = b"".join([encode(r) for r in records])     # all encoded before any write
        self.stream.write(data)
        self.records += len(records)

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:         # the reader has gone: nothing more to hand on
            pass

    def stats(self) -> dict[str, Any]:
        return {"records_written": self.records}
