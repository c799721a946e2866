"""How matching events are written: human lines (the HumanEncoder of trace and
`log show`, every name escaped), JSON lines (the one serialised form) or CSV."""
from __future__ import annotations

import csv
import io
from typing import Any, BinaryIO

from ..events import Event
from ..names import errno_name
from ..sinks.encode import HumanEncoder, JsonEncoder, escape, iso_time

CSV_COLUMNS = ("time", "seq", "aliases", "op", "syscall", "result", "path", "path2",
               "pid", "ppid", "uid", "euid", "gid", "loginuid", "comm", "exe", "keys",
               "backend", "container", "time_ns")


class HumanOut:
    def __init__(self, out: BinaryIO, color: bool = False) -> None:
        self.out = out
        self.encoder = HumanEncoder(color=color)

    def write(self, d: dict[str, Any]) -> None:
        line = self.encoder.encode(Event.from_dict(d))
        host = d.get("host")
        if host is not None:                # a fleet's stream: which host it was
            line = f"{escape(str(host))} ".encode("utf-8", "surrogateescape") + line
        self.out.write(line)


class JsonOut:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.encoder = JsonEncoder()

    def write(self, d: dict[str, Any]) -> None:
        self.out.write(self.encoder.encode_map(d))


class CsvOut:
    """RFC 4180 CSV with a header row; names keep their exact bytes (a name that is
    not UTF-8 is written as its raw bytes), lists are joined with commas."""

    def __init__(self, out: BinaryIO, host: bool = False) -> None:
        self.out = out
        self.buf = io.StringIO()
        self.writer = csv.writer(self.buf, lineterminator="\r\n")
        self.columns = (("host",) if host else ()) + CSV_COLUMNS    # host: a fleet's
        self.writer.writerow(self.columns)
        self._emit()

    def _emit(self) -> None:
        self.out.write(self.buf.getvalue().encode("utf-8", "surrogateescape"))
        self.buf.seek(0)
        self.buf.truncate()

    def write(self, d: dict[str, Any]) -> None:
        row = []
        for col in self.columns:
            if col == "time":
                v: Any = iso_time(d.get("time", 0))
            elif col == "time_ns":
                v = d.get("time", "")
            elif col == "result":
                r = d.get("result")
                v = "" if r is None else errno_name(r)
            elif col in ("aliases", "keys"):
                v = ",".join(d.get(col) or ())
            elif col == "container":
                c = d.get("container")
                v = c.get("id", "") if isinstance(c, dict) else ""
            else:
                v = d.get(col)
                v = "" if v is None else v
            row.append(v)
        self.writer.writerow(row)
        self._emit()
