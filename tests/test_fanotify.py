"""The fanotify backend on the real kernel interface."""
import os
import shutil
import subprocess
import sys
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


def test_create_then_link_before_the_read_keeps_its_create(tree):
    """The operation comes from the event (the entry's own inode), not from what the
    name shows when the event is read: linked before the read, still a create."""
    w, _ = tree
    be = backend_for(watch_rule(w))
    try:
        with open(f"{w}/f", "w") as fh:
            fh.write("x")
        os.link(f"{w}/f", f"{w}/g")             # before anything is read
        got = drain(be)
        ino = os.stat(f"{w}/f").st_ino
        assert [(e.op, e.path, e.path2) for e in got] == [
            ("create", f"{w}/f", None), ("link", None, f"{w}/g")]
        assert [e.ino for e in got] == [ino, ino]
        assert all(e.inferred is None for e in got)     # decided from the events
    finally:
        be.close()


def test_link_of_a_file_older_than_the_audit(tree):
    w, o = tree
    with open(f"{o}/old", "w") as fh:
        fh.write("x")
    time.sleep(0.05)            # born before the marks, on any clock granularity
    be = backend_for(watch_rule(w))
    try:
        os.link(f"{o}/old", f"{w}/new")
        os.unlink(f"{o}/old")                   # only one name left when read
        got = [e for e in drain(be) if e.path2 == f"{w}/new" or e.path == f"{w}/new"]
        assert [(e.op, e.path, e.path2, e.inferred) for e in got] == [
            ("link", None, f"{w}/new", None)]
    finally:
        be.close()


def test_undecidable_create_or_link_says_inferred(tree):
    """A file rule marks only its directory: a file made elsewhere after the start and
    linked in cannot be told from a create by the event; the answer (the link count
    when read) is marked as inferred."""
    w, o = tree
    be = backend_for(parse_line(f"-w {w}/target -p wa").rule)
    try:
        time.sleep(0.05)
        with open(f"{o}/made", "w") as fh:
            fh.write("x")
        os.link(f"{o}/made", f"{w}/target")
        got = drain(be)
        assert [(e.op, e.path, e.path2, e.inferred) for e in got] == [
            ("link", None, f"{w}/target", ["op"])]
    finally:
        be.close()


def test_events_before_an_exec_are_marked_stale(tree):
    """A process that executes another program before its events are read: /proc
    now describes the new program, so those events are marked stale."""
    w, _ = tree
    be = backend_for(watch_rule(w))
    sleep = os.path.realpath(shutil.which("sleep"))
    proc = subprocess.Popen([
        sys.executable, "-c", f"import os; open('{w}/before', 'w').close(); "
        f"os.execv('{sleep}', ['sleep', '5'])"])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:      # exec'd, still running, nothing read
            try:
                if os.readlink(f"/proc/{proc.pid}/exe") == sleep:
                    break
            except OSError:
                pass
            time.sleep(0.02)
        got = [e for e in drain(be) if e.pid == proc.pid]
        before = [e for e in got if e.path == f"{w}/before"]
        assert [(e.op, e.stale) for e in before] == [("create", True)]
    finally:
        proc.kill()
        proc.wait()
        be.close()


def test_merged_events_are_marked_and_the_summary_says_merging_is_not_counted(tree):
    """Hold the reader while one process changes one file several times: the kernel
    folds them into one event.  Each operation of its mask is reported, marked merged,
    and the summary says what merging hides instead of a bare "0 lost"."""
    w, _ = tree
    open(f"{w}/f", "w").close()
    be = backend_for(watch_rule(w))
    seen = ListSink()
    aud = Auditor(be, be.rules, [seen])
    try:
        os.chmod(f"{w}/f", 0o600)
        with open(f"{w}/f", "a") as fh:
            fh.write("x")
        os.chmod(f"{w}/f", 0o640)
        with open(f"{w}/f", "a") as fh:
            fh.write("y")
        aud.poll_once(0.5)
        aud.poll_once(0.3)
        got = [(e.op, e.path, e.access, e.merged) for e in seen.events]
        assert got == [("attr", f"{w}/f", None, True), ("open", f"{w}/f", "w", True)]
        aud.finish()
        summary = aud.summary()
        assert "events lost: 0 (fanotify_overflow=0)" in summary
        assert any(line.startswith("not counted: fanotify merges") for line in summary)
        assert seen.events[0].to_dict()["merged"] is True
    finally:
        be.close()


def test_filesystem_mounted_below_later_is_watched_from_the_next_read(tree):
    w, _ = tree
    os.mkdir(f"{w}/mnt")
    be = backend_for(watch_rule(w))
    try:
        subprocess.run(["mount", "-t", "tmpfs", "fswa", f"{w}/mnt"], check=True)
        assert drain(be) == []                  # the read notices the new mount
        open(f"{w}/mnt/x", "w").close()
        os.chmod(f"{w}/mnt/x", 0o600)
        got = drain(be)
        assert [(e.op, e.path) for e in got] == [("create", f"{w}/mnt/x"),
                                                 ("attr", f"{w}/mnt/x")]
        assert got[0].dev == os.stat(f"{w}/mnt").st_dev    # the tmpfs inode's own
    finally:
        be.close()
        subprocess.run(["umount", f"{w}/mnt"], check=False)


def test_removing_one_directory_rule_keeps_another_on_the_same_filesystem(tree):
    """Both rules share one filesystem mark: removing a rule must not remove it."""
    w, o = tree
    be = backend_for(watch_rule(w), watch_rule(o))
    try:
        gone = next(r for r in be.rules if r.target == w)
        be.rules.apply([parse_line(f"-W {w}")])
        be.remove_rule(0, gone)
        open(f"{o}/still", "w").close()
        assert [(e.op, e.path) for e in drain(be)] == [("create", f"{o}/still")]
    finally:
        be.close()
