"""Sinks against their real receivers: rsyslog (UDP, TCP with octet counting, a local
socket), systemd-journald (its native protocol), the auditd text format read by the
real ausearch and aureport, a JSON-lines file; and sinks that are dead or stalled never
hold up auditing."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from receivers import Journald, Rsyslog, free_port, wait_for
from tracehelp import REPO, Trace

from fswatchaudit import backends

RAW_NAME = b"a b\xff\nq\"]"          # a space, a raw byte, a newline, a quote, a bracket
EBPF = backends.probe("ebpf")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="starts system daemons")


@pytest.fixture
def base():
    d = tempfile.mkdtemp(prefix="fswa-sinks-", dir="/tmp")
    os.chmod(d, 0o755)
    os.mkdir(os.path.join(d, "w"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def workload(w: str) -> list[str]:
    """Three operations on the watched directory; the paths they name."""
    raw = os.path.join(os.fsencode(w), RAW_NAME)
    with open(raw, "wb"):
        pass
    os.mkdir(os.path.join(w, "d"))
    os.rename(os.path.join(w, "d"), os.path.join(w, "e"))
    return [os.fsdecode(raw), os.path.join(w, "d"), os.path.join(w, "e")]


def run_trace(backend: str, w: str, *sink_args: str, events: int = 3,
              records: list | None = None) -> list[dict]:
    """The events of a trace of the workload; ``records`` gets every record printed."""
    trace = Trace("--backend", backend, "-k", "sinktest", *sink_args, w)
    workload(w)
    trace.wait_for(events)
    got, stderr, code = trace.stop()
    assert code == 0, stderr
    if records is not None:
        records += trace.records
    return got


@pytest.fixture
def rsyslog(base):
    try:
        server = Rsyslog(base)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield {"udp": server.udp, "tcp": server.tcp, "unix": server.unix, "out": server.out}
    server.stop()


def received(path: str, count: int) -> list[tuple[str, str, str, dict]]:
    def lines():
        if not os.path.exists(path):
            return None
        with open(path) as fh:
            got = [line.rstrip("\n").split("|", 3) for line in fh if line.strip()]
        return got if len(got) >= count else None
    return [(i, app, msgid, json.loads(sd) if msgid == "ev" else sd)
            for i, app, msgid, sd in wait_for(lines, f"{count} messages at rsyslog")]


@needs_root
def test_syslog_to_a_real_rsyslog_over_udp_tcp_and_the_local_socket(base, rsyslog):
    w = os.path.join(base, "w")
    trace_records: list[dict] = []
    got = run_trace("inotify", w, "--sink", f"syslog:udp://127.0.0.1:{rsyslog['udp']}",
                    "--sink", f"syslog:tcp://127.0.0.1:{rsyslog['tcp']}",
                    "--sink", f"syslog:unix:{rsyslog['unix']}", records=trace_records)
    events = [e for e in got if e["t"] == "ev"]
    msgs = received(rsyslog["out"], 3 * len(trace_records))
    for transport in ("imudp", "imtcp", "imuxsock"):
        evs = [sd["fswatchaudit@32473"] for i, app, msgid, sd in msgs
               if i == transport and msgid == "ev"]
        assert all(app == "fswatchaudit" for i, app, _, _ in msgs)
        # rsyslog parsed the structured data back into the event's fields
        assert [(e["op"], e["key"]) for e in evs] == \
            [(e["op"], "sinktest") for e in events], transport
        first = evs[0]
        assert first["path"].endswith("a b\\xff\\nq\"]")    # escaped, then SD-escaped
        assert first["seq"] == str(events[0]["seq"])


@pytest.fixture
def journald(base):
    try:
        server = Journald()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield server.namespace, server.socket
    server.stop()


@needs_root
def test_journald_native_protocol_with_our_fields(base, journald):
    namespace, sock = journald
    w = os.path.join(base, "w")
    got = run_trace("inotify", w, "--sink", f"journald:{sock}")
    events = [e for e in got if e["t"] == "ev"]

    def entries():
        r = subprocess.run(["journalctl", f"--namespace={namespace}", "-o", "json",
                            "--no-pager", "FSWATCHAUDIT_KEY=sinktest"],
                           capture_output=True, text=True)
        found = [json.loads(line) for line in r.stdout.splitlines()]
        return found if len(found) >= len(events) else None
    found = wait_for(entries, "the entries in the journal")
    assert [x["FSWATCHAUDIT_OP"] for x in found] == [e["op"] for e in events]
    assert all(x["SYSLOG_IDENTIFIER"] == "fswatchaudit" for x in found)
    # the exact bytes of the name: journalctl gives a non-text value as a byte array
    path = found[0]["FSWATCHAUDIT_PATH"]
    assert bytes(path) == os.fsencode(os.path.join(w, "")) + RAW_NAME


@pytest.mark.skipif(not EBPF.usable, reason=f"eBPF backend: {EBPF.reason}")
def test_auditd_format_read_by_the_real_ausearch_and_aureport(base):
    if shutil.which("ausearch") is None:
        pytest.fail("ausearch is not installed (scripts/setup installs auditd)")
    w = os.path.join(base, "w")
    log = os.path.join(base, "audit.log")
    got = run_trace("ebpf", w, "--sink", f"auditd:{log}")
    events = [e for e in got if e["t"] == "ev"]
    r = subprocess.run(["ausearch", "-if", log, "-k", "sinktest", "-i"],
                       capture_output=True, text=True, errors="replace")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("type=SYSCALL") == len(events)
    assert "syscall=mkdir" in r.stdout and "syscall=rename" in r.stdout
    assert f"name={w}/e" in r.stdout
    raw = os.fsdecode(os.path.join(os.fsencode(w), RAW_NAME))
    r = subprocess.run(["ausearch", "-if", log, "-f", f"{w}/e"], capture_output=True,
                       text=True, errors="replace")
    assert r.returncode == 0 and "nametype=CREATE" in r.stdout
    r = subprocess.run(["aureport", "-if", log, "-f", "--summary"], capture_output=True,
                       text=True, errors="replace")
    assert f"{w}/e" in r.stdout and f"{w}/d" in r.stdout
    # the hostile name is hex in the file and decoded by ausearch -i
    with open(log, "rb") as fh:
        text = fh.read()
    assert os.fsencode(raw).hex().upper().encode() in text
    assert all(line.startswith(b"type=") for line in text.splitlines())   # none forged


def test_jsonl_sink_writes_the_one_serialised_form(base):
    w = os.path.join(base, "w")
    out = os.path.join(base, "records.jsonl")
    got = run_trace("inotify", w, "--sink", f"jsonl:{out}")
    with open(out) as fh:
        lines = [json.loads(line) for line in fh]
    assert lines[0]["t"] == "hdr"
    assert [x for x in lines if x["t"] == "ev"] == [e for e in got if e["t"] == "ev"]
    assert os.stat(out).st_mode & 0o777 == 0o600


def test_dead_and_stalled_sinks_never_hold_up_auditing(base):
    """A TCP syslog receiver that is not there, and one that accepts but never reads:
    every event still reaches the other outputs at once, and the summary counts what
    the failing sinks could not send."""
    w = os.path.join(base, "w")
    dead = free_port()
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(1)
    port = stalled.getsockname()[1]
    trace = Trace("--backend", "inotify", "--sink", f"syslog:tcp://127.0.0.1:{dead}",
                  "--sink", f"syslog:tcp://127.0.0.1:{port}", w)
    try:
        started = time.monotonic()
        for n in range(3000):
            os.mkdir(os.path.join(w, f"d{n}"))
        trace.wait_for(3000, timeout=60)
        assert time.monotonic() - started < 30
        events, stderr, code = trace.stop()
        records = len(trace.records)           # events, and the lost counts around them
    finally:
        stalled.close()
    assert code == 0 and len(events) == 3000
    assert "sink syslog: 0 sent" in stderr and "failing" in stderr
    line = next(x for x in stderr.splitlines() if x.startswith("sink syslog-1:"))
    sent, queued, lost = (int(x.split()[0]) for x in line.split(":", 1)[1].split(",")[:3])
    assert sent + queued + lost == records


def test_a_bad_sink_is_refused_before_anything_starts(base):
    w = os.path.join(base, "w")
    for spec, message, code in (("nosuch:x", "unknown sink kind 'nosuch'", 2),
                                ("auditd:relative.log", "is not an absolute path", 2),
                                ("syslog:ftp://x", "use unix:PATH", 2),
                                ("auditd:/tmp/x.log", "needs events with syscall", 2)):
        r = subprocess.run([sys.executable, "-m", "fswatchaudit", "trace", "--backend",
                            "inotify", "--sink", spec, "--duration", "0.1", w],
                           capture_output=True, text=True, cwd=REPO)
        assert r.returncode == code and message in r.stderr, (spec, r.stderr)
        assert "Traceback" not in r.stderr


class _SlowTransport:
    """A transport that takes ``delay`` seconds a record, or blocks until released."""

    def __init__(self, delay: float = 0.0, block: bool = False) -> None:
        import threading
        self.name, self.delay, self.got = "slow", delay, 0
        self.release = threading.Event()
        if not block:
            self.release.set()

    def write(self, record) -> None:
        self.release.wait()
        time.sleep(self.delay)
        self.got += 1

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.release.set()

    def stats(self) -> dict:
        return {}


def test_close_waits_while_a_slow_sink_drains_and_counts_what_a_stuck_one_holds(
        monkeypatch):
    import threading

    from fswatchaudit.events import Marker
    from fswatchaudit.sinks import queued
    monkeypatch.setattr(queued, "CLOSE_WAIT", 0.3)
    crashes: list = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    slow = _SlowTransport(delay=0.002)
    sink = queued.QueuedSink(slow)
    for n in range(600):                    # about 1.2 s of sending: past CLOSE_WAIT
        sink.write(Marker("mark", {"n": n}))
    sink.close()
    assert (slow.got, sink.sent, sink.lost) == (600, 600, 0)
    stuck = _SlowTransport(block=True)
    sink = queued.QueuedSink(stuck)
    for n in range(50):
        sink.write(Marker("mark", {"n": n}))
    sink.close()
    time.sleep(0.1)                         # the thread, released by close, ends
    assert sink.lost == 50 and sink.sent == 0 and sink.stats()["queued"] == 0
    assert not crashes


def test_summary_counts_stay_bounded_whatever_the_names():
    """A process making ever new names (200,000 failed unlinks of distinct names) must
    not grow the summary without bound: beyond max_rows paths they share one row, and
    every event is still counted."""
    from fswatchaudit.events import Event
    from fswatchaudit.sinks.summary import SummarySink
    sink = SummarySink(top=5, max_rows=100)
    for i in range(1000):
        sink.write(Event(op="unlink", path=f"/srv/f{i}", backend="ebpf", result=-2,
                         aliases=["fs-remove"], exe="/usr/bin/flood"))
    assert len(sink.per_path) == 101 and len(sink.per_program) == 1
    assert sum(c["total"] for c in sink.per_path.values()) == 1000
    lines = sink.lines()
    assert any("900" in line and "(other paths, beyond the 100" in line for line in lines)


class _FlakyBatchTransport:
    """Takes batches; the second call takes only its first 3 records, then fails."""

    def __init__(self) -> None:
        self.name, self.got, self.calls = "flaky", [], 0

    def write(self, record) -> None:
        self.write_many([record])

    def write_many(self, records) -> None:
        from fswatchaudit.sinks.queued import PartlySent
        self.calls += 1
        if self.calls == 2:
            self.got += records[:3]
            raise PartlySent(3, OSError("connection reset"))
        if self.calls == 3:
            raise OSError("refused")
        self.got += records

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def stats(self) -> dict:
        return {}


def test_queued_batches_count_each_record_once_when_a_batch_goes_out_in_part(monkeypatch):
    from fswatchaudit.events import Marker
    from fswatchaudit.sinks import queued
    monkeypatch.setattr(queued, "BACKOFF_FIRST", 0.01)
    flaky = _FlakyBatchTransport()
    sink = queued.QueuedSink(flaky, max_records=1000)
    sent = [Marker("mark", {"n": n}) for n in range(1200)]
    for n in range(0, 1200, 100):
        sink.write_many(sent[n:n + 100])    # beyond 1,000 queued: counted as lost
    deadline = time.monotonic() + 10
    while sink.stats()["queued"] and time.monotonic() < deadline:
        time.sleep(0.01)
    sink.close()
    st = sink.stats()
    assert flaky.calls >= 4 and st["errors"] == 2
    assert flaky.got == sent[:len(flaky.got)]           # in order, none twice
    assert st["sent"] == len(flaky.got) and st["sent"] + st["lost"] == 1200
    assert st["lost"] == 1200 - len(flaky.got) and st["queued"] == 0
