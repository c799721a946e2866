"""Damaged logs: flipped bytes, truncations and inflations of a real log never make
`log show` raise; it prints every record before the damage, says where the damage is
and exits 1.  Names with raw bytes survive the log and come back exactly."""
import io
import json
import os
import random
import subprocess
import sys

import msgpack
import pytest
from tracehelp import REPO

from fswatchaudit.cli.log_cmd import show_logs
from fswatchaudit.events import Event, LostCounts, ProcessState, RulesInForce
from fswatchaudit.sinks import HumanEncoder, JsonEncoder, LogReader, RotatingFileSink

RAW = b"/srv/.x\xff\xfe\nFORGED pid=1 \x1b[2J\x07".decode("utf-8", "surrogateescape")


def make_log(path: str) -> None:
    sink = RotatingFileSink(path, {"backend": "test", "host": "h"}, flush_interval=3600)
    for n in range(200):
        sink.write(Event(op="rename", path=f"/srv/{n}", path2=RAW + str(n), backend="test",
                         seq=n, pid=n, comm="mv\udcff", exe="/bin/mv", keys=["k"]))
        if n % 20 == 0:
            sink.write(ProcessState(pid=n, comm="sh", reason="fork"))
            sink.write(LostCounts({"ringbuf": n}))
    sink.write(RulesInForce([f"-w {RAW}"], "d", "change"))
    sink.close()


def boundaries(data: bytes) -> list[int]:
    """Where each whole record ends."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(data)
    ends = []
    for _ in unpacker:
        ends.append(unpacker.tell())
    return ends


def run_show(path: str) -> tuple[int, list[bytes], str]:
    out, err = io.BytesIO(), io.StringIO()
    code = show_logs([path], as_json=True, out=out, err=err)
    return code, out.getvalue().splitlines(), err.getvalue()


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("log") / "audit.log")
    make_log(path)
    with open(path, "rb") as fh:
        data = fh.read()
    code, lines, err = run_show(path)
    assert code == 0 and err == ""
    return data, boundaries(data), lines


def check_prefix(lines, good_lines, ends, damage_at):
    whole_before = sum(1 for end in ends if end <= damage_at)
    assert lines[:whole_before] == good_lines[:whole_before]


def test_raw_bytes_in_names_survive_the_log_exactly(tmp_path, original):
    path = str(tmp_path / "a.log")
    make_log(path)
    events = [r for r in LogReader(path) if r["t"] == "ev"]
    assert events[3]["path2"] == RAW + "3" and events[3]["comm"] == "mv\udcff"
    assert events[3]["path2"].encode("utf-8", "surrogateescape").startswith(b"/srv/.x\xff\xfe\n")
    _, _, lines = original
    # JSON: one line per record whatever the name holds, and the bytes come back
    line = next(rec for rec in map(json.loads, lines) if rec.get("seq") == 3)
    assert line["path2"].encode("utf-8", "surrogateescape") == (RAW + "3").encode(
        "utf-8", "surrogateescape")
    # human: no newline, escape or bell reaches the line
    human = HumanEncoder().encode(Event(op="create", path=RAW, backend="t"))
    assert human.count(b"\n") == 1 and b"\x1b" not in human and b"\x07" not in human
    assert b"\\xff\\xfe\\nFORGED pid=1 \\x1b[2J\\x07" in human
    assert JsonEncoder().encode(Event(op="create", path=RAW, backend="t")).count(b"\n") == 1


def test_flipped_bytes(tmp_path, original):
    data, ends, good = original
    rng = random.Random(7)
    path = str(tmp_path / "flip.log")
    for _ in range(150):
        pos = rng.randrange(len(data))
        bad = bytearray(data)
        bad[pos] ^= 1 << rng.randrange(8)
        with open(path, "wb") as fh:
            fh.write(bad)
        code, lines, err = run_show(path)
        assert code in (0, 1), err
        assert "Traceback" not in err
        check_prefix(lines, good, ends, pos)
        if code == 0:           # the flip changed a value, not the framing
            assert len(lines) == len(good) and err == ""
        else:
            assert err.startswith("fswatchaudit: ") and ("damaged at byte" in err
                                                        or "torn" in err)


def test_truncations(tmp_path, original):
    data, ends, good = original
    rng = random.Random(8)
    path = str(tmp_path / "cut.log")
    for cut in [0, 1, ends[0], ends[0] + 1] + [rng.randrange(len(data)) for _ in range(60)]:
        with open(path, "wb") as fh:
            fh.write(data[:cut])
        code, lines, err = run_show(path)
        check_prefix(lines, good, ends, cut)
        if cut == 0:
            assert code == 1 and "empty file" in err
        elif cut in ends:
            assert code == 0 and len(lines) == ends.index(cut) + 1
        else:
            assert code == 1 and "torn" in err


def test_inflations(tmp_path, original):
    data, ends, good = original
    rng = random.Random(9)
    path = str(tmp_path / "grow.log")
    insertions = [b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
                  b"\x81\x91\x01\x02",                  # a map whose key is a list
                  b"\x81\xa1t\x05", b"\x80", b"\xc1"]
    insertions += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
                   for _ in range(40)]
    for extra in insertions:
        pos = rng.choice(ends[:-1])
        with open(path, "wb") as fh:
            fh.write(data[:pos] + extra + data[pos:])
        code, lines, err = run_show(path)
        assert "Traceback" not in err
        check_prefix(lines, good, ends, pos)
        assert code == 1 or len(lines) > len(good), err


def test_cli_reports_damage_with_an_exit_code(tmp_path, original):
    data, ends, _ = original
    path = str(tmp_path / "bad.log")
    with open(path, "wb") as fh:
        fh.write(data[:ends[10]] + b"\xc1" + data[ends[10]:])
    empty = str(tmp_path / "empty.log")
    open(empty, "wb").close()
    for target, message in ((path, f"damaged at byte {ends[10]}"), (empty, "empty file")):
        r = subprocess.run([sys.executable, "-m", "fswatchaudit", "log", "show", target],
                           capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "fswatchaudit", "log", "show", path],
                       capture_output=True, cwd=REPO)
    assert len(r.stdout.splitlines()) == 11
    assert os.path.getsize(path) > 0
