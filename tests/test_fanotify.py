"""The fanotify backend on the real kernel interface."""
import os
import shutil
import subprocess
import tempfile
import time

import pytest
from tracehelp import Trace, drain

from fswatchaudit.auditor import Auditor
from fswatchaudit.backends import probe
from fswatchaudit.rules import RuleSet, parse_line, watch_rule
from fswatchaudit.sinks import ListSink

FAN = probe("fanotify")
pytestmark = pytest.mark.skipif(not FAN.usable, reason=f"fanotify backend: {FAN.reason}")


@pytest.fixture
def tree():
    base = tempfile.mkdtemp(prefix="fswa-fan-", dir="/tmp")
    w, o = os.path.join(base, "w"), os.path.join(base, "o")
    os.mkdir(w)
    os.mkdir(o)
    yield w, o
    shutil.rmtree(base)


def backend_for(*rules, **kw):
    from fswatchaudit.backends.fanotify import FanotifyBackend
    rs = RuleSet()
    for r in rules:
        rs.add(r)
    be = FanotifyBackend(rs, **kw)
    be.start()
    return be


def test_trace_cli_attributes_events_to_processes(tree):
    w, o = tree
    trace = Trace("--backend", "fanotify", "-k", "f", w)
    proc = subprocess.Popen(["sh", "-c", "echo x > made; mkdir -p a/b/c && echo y > a/b/c/f; "
                             "mv made a/moved; sleep 0.5"], cwd=w)
    trace.wait_for(6)
    assert proc.wait() == 0
    events, stderr, code = trace.stop()
    assert code == 0, stderr
    got = [(e["op"], e["path"], e.get("path2"), e["pid"]) for e in events]
    assert got == [("create", f"{w}/made", None, proc.pid),
                   ("mkdir", f"{w}/a", None, got[1][3]), ("mkdir", f"{w}/a/b", None, got[1][3]),
                   ("mkdir", f"{w}/a/b/c", None, got[1][3]),
                   ("create", f"{w}/a/b/c/f", None, proc.pid),
                   ("rename", f"{w}/made", f"{w}/a/moved", got[5][3])]
    # facts are read when the event is read: a process gone by then is marked stale
    assert all(e.get("stale") or (e["uid"] == 0 and "comm" in e) for e in events)
    assert "with fanotify" in stderr and "events lost: 0" in stderr


def test_short_lived_process_is_marked_stale_or_complete(tree):
    w, _ = tree
    open(f"{w}/f", "w").close()
    be = backend_for(watch_rule(w))
    try:
        proc = subprocess.Popen(["chmod", "600", f"{w}/f"])
        proc.wait()
        time.sleep(0.2)         # gone before its event is read
        got = drain(be)
        assert [(e.op, e.pid) for e in got] == [("attr", proc.pid)]
        assert got[0].stale is True           # its facts could not be read any more
    finally:
        be.close()


def test_outside_not_reported_and_rules_change_at_run_time(tree):
    w, o = tree
    be = backend_for(watch_rule(w, key="w"))
    seen = ListSink()
    aud = Auditor(be, be.rules, [seen])
    try:
        open(f"{o}/x", "w").close()               # same filesystem, not watched
        open(f"{w}/a", "w").close()
        aud.apply([parse_line(f"-w {o} -k o")])
        open(f"{o}/y", "w").close()
        aud.apply([parse_line(f"-W {w} -k w")])
        open(f"{w}/b", "w").close()
        aud.poll_once(0.5)
        aud.poll_once(0.3)
        assert [(e.op, e.path, e.keys) for e in seen.events] == [
            ("create", f"{w}/a", ["w"]), ("create", f"{o}/y", ["o"])]
        # each change is a record of the rules then in force, in the same stream
        changes = [r for r in seen.records if r.kind == "rules"]
        assert [(c.reason, len(c.rules)) for c in changes] == [("change", 2), ("change", 1)]
    finally:
        be.close()


@pytest.fixture
def small_queue():
    knob = "/proc/sys/fs/fanotify/max_queued_events"
    with open(knob) as fh:
        old = fh.read()
    with open(knob, "w") as fh:
        fh.write("32")
    yield
    with open(knob, "w") as fh:
        fh.write(old)


def test_queue_overflow_is_counted(tree, small_queue):
    w, _ = tree
    be = backend_for(watch_rule(w), unlimited_queue=False)
    try:
        for i in range(200):
            open(f"{w}/f{i}", "w").close()
        drain(be)
        assert be.lost()["fanotify_overflow"] >= 1
    finally:
        be.close()
