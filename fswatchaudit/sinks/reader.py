"""Reading logs back: a streaming reader that survives a torn last record, the
rotated-file order, and `log show`."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any, BinaryIO, TextIO

import msgpack

from ..events import record_from_dict
from .encode import Encoder, HumanEncoder, JsonEncoder

READ_CHUNK = 1 << 16


class LogFormatError(ValueError):
    """Data in a log that is not a whole record where one must be."""


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


def show(paths: list[str], as_json: bool = False, out: BinaryIO | None = None,
         err: TextIO = sys.stderr, all_rotated: bool = False) -> int:
    """`log show`: every record as a human line or a JSON line (the one serialised
    form: each map with its "t" tag)."""
    stream = out if out is not None else sys.stdout.buffer
    encoder: Encoder = JsonEncoder() if as_json else HumanEncoder()
    files: list[str] = []
    for p in paths:
        files += rotated_files(p) if all_rotated else [p]
    for data in iter_records(files, err):
        record = record_from_dict(data)
        if record is None or as_json:
            stream.write(encoder.encode_map(data))
        else:
            stream.write(encoder.encode(record))
    stream.flush()
    return 0
