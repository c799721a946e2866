"""Reading logs back: a streaming reader that survives a torn last record, the
rotated-file order, and `log show`."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any, BinaryIO, TextIO

import msgpack

from ..events import check_types, record_from_dict
from .encode import Encoder, HumanEncoder, JsonEncoder, as_text

READ_CHUNK = 1 << 16
MAX_RECORD = 16 << 20       # far above any record the writer makes


def _readable(obj: dict[str, Any]) -> dict[str, Any]:
    """A record as readers show it: names back to text, and the hash chain's fields
    (``h`` in every record, ``prev`` in headers, the MACs of seals) left to
    `fswatchaudit log verify`, seals' binary values as hex."""
    obj.pop("h", None)
    if obj.get("t") == "hdr":
        obj.pop("prev", None)
    elif obj.get("t") == "seal":
        return {k: v.hex() if isinstance(v, bytes) else v for k, v in obj.items()}
    return as_text(obj)


class LogFormatError(ValueError):
    """Data in a log that is not a whole record where one must be."""


class LogReader:
    """Streams the records of one file.  Damage raises LogFormatError naming the byte
    where it starts, after every whole record before it was given out; after
    iteration, ``torn`` is the number of bytes of an incomplete last record (0 for a
    clean file)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.torn = 0

    def _damage(self, where: int, what: str) -> LogFormatError:
        return LogFormatError(f"{self.path}: damaged at byte {where}: {what}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False,
                                    max_buffer_size=MAX_RECORD)
        fed = whole = 0
        first = True
        with open(self.path, "rb") as fh:
            while True:
                chunk = fh.read(READ_CHUNK)
                if not chunk:
                    break
                try:
                    unpacker.feed(chunk)
                except Exception:       # a record claims more than MAX_RECORD bytes
                    raise self._damage(whole, "a record larger than any the writer "
                                              "makes") from None
                fed += len(chunk)
                while True:
                    start = whole
                    try:
                        obj = unpacker.unpack()
                    except msgpack.OutOfData:
                        break
                    except Exception as exc:    # any malformed data, whatever msgpack says
                        raise self._damage(start, f"not a log record ({exc})") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
                        raise self._damage(start, "not a log record")
                    if first and obj["t"] != "hdr":
                        raise self._damage(start, "the file does not begin with a log "
                                                  "header")
                    obj = _readable(obj)
                    try:
                        check_types(obj)
                    except ValueError as exc:
                        raise self._damage(start, f"a record holds {exc}") from None
                    first = False
                    whole = unpacker.tell()
                    yield obj
        if first and fed == 0:
            raise LogFormatError(f"{self.path}: empty file, not a log (no header)")
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


def iter_records(paths: list[str], err: TextIO | None = None,
                 torn: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Records of several files in turn; files whose last record is torn (a crash in
    the middle of a write) are said on ``err`` and listed in ``torn``."""
    for path in paths:
        reader = LogReader(path)
        yield from reader
        if reader.torn:
            if torn is not None:
                torn.append(path)
            if err is not None:
                print(f"fswatchaudit: {path}: last record is torn ({reader.torn} bytes "
                      "ignored); every record before it was read", file=err)


def show(paths: list[str], as_json: bool = False, out: BinaryIO | None = None,
         err: TextIO = sys.stderr, all_rotated: bool = False, color: bool = False) -> int:
    """`log show`: every record as a human line or a JSON line (the one serialised
    form: each map with its "t" tag).  0 for whole files, 1 when a last record is
    torn; other damage raises LogFormatError once the records before it are out."""
    stream = out if out is not None else sys.stdout.buffer
    encoder: Encoder = JsonEncoder() if as_json else HumanEncoder(color=color)
    files: list[str] = []
    for p in paths:
        files += rotated_files(p) if all_rotated else [p]
    torn: list[str] = []
    count = 0
    for data in iter_records(files, err, torn):
        try:
            record = record_from_dict(data)
            line = (encoder.encode_map(data) if record is None or as_json
                    else encoder.encode(record))
        except Exception as exc:    # values no writer makes: damage inside a record
            raise LogFormatError(f"damaged record after {count} whole records: "
                                 f"{type(exc).__name__}: {exc}") from None
        stream.write(line)
        count += 1
    stream.flush()
    return 1 if torn else 0
