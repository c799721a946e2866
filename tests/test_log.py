"""msgpack log: round trip, torn tail, flush timing behaviour, rotation, file safety,
full disk.  Real files; the full-disk cases use a real small tmpfs."""
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import msgpack
import pytest
from tracehelp import REPO

from fswatchaudit.events import SCHEMA_KEYS, Event, LostCounts, ProcessState, RulesInForce
from fswatchaudit.sinks import LogFormatError, LogReader, rotated_files, show
from fswatchaudit.sinks import RotatingFileSink as LogWriter

HEADER = {"host": "h", "boot_id": "b", "start": 1, "backend": "test", "rules_digest": "d"}


def full_event(n: int) -> Event:
    return Event(op="rename", path=f"/a/{n}", path2=f"/b/{n}", backend="test", time=n,
                 seq=n, aliases=["fs-create", "fs-remove"], syscall="renameat2", result=0,
                 dev=2049, ino=n, pid=1, tid=2, ppid=3, uid=4, euid=5, gid=6, loginuid=7,
                 comm="mv", exe="/bin/mv", keys=["k"], access=None)


def records(path):
    return list(LogReader(path))


def wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_round_trip_every_record_kind(tmp_path):
    path = str(tmp_path / "a.log")
    w = LogWriter(path, HEADER)
    w.write(full_event(1))
    w.write(ProcessState(pid=9, ppid=1, comm="sh", reason="fork"))
    w.write(LostCounts({"ringbuf": 3}))
    w.write(RulesInForce(["-w /x"], "abc", reason="start"))
    w.close()
    got = records(path)
    assert [r["t"] for r in got] == ["hdr", "ev", "state", "lost", "rules"]
    assert got[0]["version"] == 1 and got[0]["backend"] == "test"
    assert got[1] == full_event(1).to_dict()
    assert set(got[1]) - {"t"} <= set(SCHEMA_KEYS)
    assert got[2]["pid"] == 9 and got[3]["counts"] == {"ringbuf": 3}
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_sinks_of_one_encoding_share_each_records_bytes(tmp_path, monkeypatch):
    """Two msgpack logs behind one fan-out: each record is encoded once (by the
    fan-out), both logs hold it; a JSON log beside them encodes its own."""
    from fswatchaudit.sinks import Fanout, JsonEncoder, MsgpackEncoder
    calls = []
    real = MsgpackEncoder.encode
    monkeypatch.setattr(MsgpackEncoder, "encode",
                        lambda self, r: calls.append(r) or real(self, r))
    paths = [str(tmp_path / f"{n}.log") for n in "ab"]
    sinks = [LogWriter(p, HEADER) for p in paths]
    sinks.append(LogWriter(str(tmp_path / "c.jsonl"), HEADER, encoder=JsonEncoder()))
    fan = Fanout(sinks)
    batch = [full_event(n) for n in range(1, 6)] + [LostCounts({"ringbuf": 1})]
    fan.write_many(batch)
    fan.close()
    assert len(calls) == len(batch)
    want = [r.to_dict() for r in batch]
    for path in paths:
        assert records(path)[1:] == want
    with open(tmp_path / "c.jsonl") as fh:
        assert [json.loads(line) for line in fh][1:] == want


def test_torn_tail_is_reported_and_nothing_before_it_lost(tmp_path):
    path = str(tmp_path / "t.log")
    w = LogWriter(path, HEADER)
    for n in range(100):
        w.write(full_event(n))
    w.close()
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size - 5)                   # cut the last record
    reader = LogReader(path)
    got = list(reader)
    assert len(got) == 100                      # header + 99 whole events
    assert reader.torn > 0
    out, err = io.BytesIO(), io.StringIO()
    assert show([path], as_json=True, out=out, err=err) == 1    # damage: not 0
    assert len(out.getvalue().splitlines()) == 100
    assert "last record is torn" in err.getvalue()


def test_garbage_in_the_middle_is_a_clear_error(tmp_path):
    path = str(tmp_path / "g.log")
    with open(path, "wb") as fh:
        fh.write(msgpack.packb({"t": "hdr", "version": 1}))
        fh.write(msgpack.packb([1, 2, 3]))
    with pytest.raises(LogFormatError, match="damaged at byte 16: not a log record"):
        records(path)


def test_flushes_about_once_a_second_without_being_asked(tmp_path):
    path = str(tmp_path / "f.log")
    w = LogWriter(path, HEADER, flush_interval=1.0)
    try:
        start = os.path.getsize(path)
        w.write(full_event(1))
        assert os.path.getsize(path) == start     # buffered, not written by the caller
        wait_until(lambda: os.path.getsize(path) > start, timeout=3)
    finally:
        w.close()


def test_high_water_flushes_early(tmp_path):
    path = str(tmp_path / "h.log")
    w = LogWriter(path, HEADER, flush_interval=3600, high_water=10_000)
    try:
        for n in range(200):
            w.write(full_event(n))
        wait_until(lambda: len(records(path)) > 1, timeout=5)
    finally:
        w.close()


def test_close_writes_everything(tmp_path):
    path = str(tmp_path / "c.log")
    w = LogWriter(path, HEADER, flush_interval=3600)
    for n in range(100_000):
        w.write(full_event(n))
    w.close()
    w.close()                                   # idempotent
    got = records(path)
    assert len(got) == 100_001
    assert [r["seq"] for r in got[1:]] == list(range(100_000))


SIGTERM_SCRIPT = r"""
import signal, sys
from fswatchaudit.events import Event
from fswatchaudit.sinks import RotatingFileSink as LogWriter
w = LogWriter(sys.argv[1], {"backend": "test"}, flush_interval=3600)
stop = False
def on_term(sig, frame):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
n = 0
while not stop:
    w.write(Event(op="create", path=f"/x/{n}", backend="test", seq=n))
    n += 1
    if n == 1000:
        print("ready", flush=True)
w.close()
print(n, flush=True)
"""


def test_sigterm_flushes_everything_acknowledged(tmp_path):
    path = str(tmp_path / "s.log")
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, path], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    written = int(proc.stdout.readline())
    assert proc.wait(30) == 0
    got = records(path)
    assert [r["seq"] for r in got[1:]] == list(range(written))


def test_rotation_keeps_n_files_each_with_a_header(tmp_path):
    path = str(tmp_path / "r.log")
    w = LogWriter(path, HEADER, rotate_size=4096, rotate_count=2, flush_interval=3600)
    for n in range(300):
        w.write(full_event(n))
        if n % 20 == 19:
            w.sync()
    w.close()
    files = rotated_files(path)
    assert files == [path + ".2", path + ".1", path]
    assert not os.path.exists(path + ".3")
    seqs = []
    for f in files:
        got = records(f)
        assert got[0]["t"] == "hdr"
        seqs += [r["seq"] for r in got if r["t"] == "ev"]
    assert seqs == sorted(seqs) and seqs[-1] == 299      # the newest are all kept
    assert w.rotate is not None


def test_symlink_at_the_log_path_is_refused(tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep me")
    link = tmp_path / "audit.log"
    link.symlink_to(target)
    with pytest.raises(OSError):
        LogWriter(str(link), HEADER)
    assert target.read_text() == "keep me"


def test_symlinked_directory_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "dirlink").symlink_to(tmp_path / "real")
    with pytest.raises(OSError):
        LogWriter(str(tmp_path / "dirlink" / "audit.log"), HEADER)
    assert os.listdir(tmp_path / "real") == []


@pytest.fixture
def small_fs():
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    d = tempfile.mkdtemp(prefix="fswa-full-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", d], check=True)
    yield d
    subprocess.run(["umount", d], check=True)
    os.rmdir(d)


def test_disk_full_keep_going_counts_and_never_corrupts(small_fs):
    path = os.path.join(small_fs, "audit.log")
    w = LogWriter(path, HEADER, disk_full="keep-going", flush_interval=3600)
    for n in range(6000):
        w.write(full_event(n))
        if n % 200 == 199:
            w.sync()
    w.close()
    assert w.records_dropped > 0
    reader = LogReader(path)
    got = list(reader)
    assert reader.torn == 0
    assert len(got) - 1 + w.records_dropped == 6000


def test_disk_full_drop_oldest_deletes_a_rotated_file(small_fs):
    path = os.path.join(small_fs, "audit.log")
    with open(os.path.join(small_fs, "audit.log.3"), "wb") as fh:
        fh.write(b"\0" * 150_000)               # an old rotated log taking the space
    w = LogWriter(path, HEADER, disk_full="drop-oldest", rotate_count=3,
                  flush_interval=3600)
    for n in range(1000):
        w.write(full_event(n))
        if n % 100 == 99:
            w.sync()
    w.close()
    assert not os.path.exists(os.path.join(small_fs, "audit.log.3"))
    assert len(records(path)) == 1001


def test_disk_full_stop(small_fs):
    path = os.path.join(small_fs, "audit.log")
    w = LogWriter(path, HEADER, disk_full="stop", space_left="200k", flush_interval=3600)
    for n in range(3000):
        w.write(full_event(n))
        if n % 100 == 99:
            w.sync()
    w.close()
    assert w.stopped and "disk full" in w.stop_reason
    got = records(path)
    # events until the stop; then, at close (the threshold does not apply), what was
    # dropped and that auditing stopped
    assert all(r["t"] in ("hdr", "ev") for r in got[:-2])
    assert got[-2]["t"] == "dropped" and got[-2]["total"] == w.records_dropped
    assert got[-1]["t"] == "mark" and got[-1]["what"] == "stop"
    assert "disk full" in got[-1]["reason"]
    assert len([r for r in got if r["t"] == "ev"]) + got[-2]["total"] == 3000


def test_disk_full_keeps_what_fits_of_one_batch(small_fs):
    path = os.path.join(small_fs, "audit.log")
    w = LogWriter(path, HEADER, disk_full="keep-going", flush_interval=3600,
                  high_water=1 << 30)
    for n in range(10_002):             # one batch, far more than the disk holds
        w.write(full_event(n))
    w.sync()
    assert 0 < w.records_written < 10_002 and w.records_dropped > 0
    w.close()
    events = [r for r in records(path) if r["t"] == "ev"]
    # every record that fitted is there, in order, and the rest is counted
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert len(events) + w.records_dropped == 10_002


@pytest.mark.parametrize("prepare, reason", [
    (lambda p: (open(p, "w").close(), os.chmod(p, 0o666), os.chown(p, 65534, 65534)),
     "owned by uid 65534"),
    (lambda p: (open(p, "w").close(), os.chmod(p, 0o644)), "others may read or write it"),
    (lambda p: (open(p, "w").close(), os.chmod(p, 0o600), os.link(p, p + ".other")),
     "2 names"),
    (lambda p: os.mkfifo(p, 0o600), "not a regular file"),
])
def test_output_file_others_can_reach_is_refused(tmp_path, prepare, reason):
    """`trace -o FILE` where FILE was made by someone else (say 0666 in a sticky /tmp),
    is readable by others, has another name or is a FIFO: refused, nothing written."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    os.chmod(tmp_path, 0o1777)
    path = str(tmp_path / "audit.log")
    prepare(path)
    before = os.stat(path)
    with pytest.raises(OSError, match=reason):
        LogWriter(path, HEADER)
    after = os.stat(path)
    assert (after.st_size, after.st_mode, after.st_uid) == (
        before.st_size, before.st_mode, before.st_uid)
    r = subprocess.run([sys.executable, "-m", "fswatchaudit", "trace", "--backend", "inotify",
                        "-o", path, "--duration", "0.1", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 1 and "refusing to write audit records" in r.stderr
    assert "Traceback" not in r.stderr


def _trace_with_log(tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, str]:
    watched = tmp_path / "w"
    watched.mkdir()
    log = str(tmp_path / "trace.log")
    proc = subprocess.Popen([sys.executable, "-m", "fswatchaudit", "trace", "--backend",
                             "inotify", "-o", log, *extra, str(watched)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    assert proc.stderr is not None
    first = proc.stderr.readline()
    while first and not first.startswith("watching "):
        first = proc.stderr.readline()
    assert first, "trace exited before watching"
    for i in range(3):
        (watched / f"f{i}").write_text("x")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, first + err), log


def _logged_creates(log: str) -> int:
    r = subprocess.run([sys.executable, "-m", "fswatchaudit", "log", "show", "--json", log],
                       capture_output=True, text=True, cwd=REPO, check=True)
    return sum(1 for line in r.stdout.splitlines() if json.loads(line).get("op") == "create")


def test_trace_with_a_log_prints_only_when_asked(tmp_path):
    r, log = _trace_with_log(tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert "events to " + log + " only" in r.stderr
    assert _logged_creates(log) == 3


def test_trace_with_a_log_and_print_prints_too(tmp_path):
    r, log = _trace_with_log(tmp_path, "--print")
    assert r.returncode == 0, r.stderr
    assert sum(" create " in line for line in r.stdout.splitlines()) == 3
    assert _logged_creates(log) == 3


def test_print_without_a_log_is_an_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fswatchaudit", "trace", "--print",
                        str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "--print applies to -o" in r.stderr
