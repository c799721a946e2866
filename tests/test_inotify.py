"""The inotify backend through the real `fswatchaudit trace`, over real directories."""
import os
import shutil
import tempfile

import pytest
from tracehelp import REPO, UNPRIVILEGED_UID, Trace, sh


# Steps of the workload with the events each one adds.  The trace must have printed a
# step's events before the next step runs: inotify reports names, and a name removed
# before the watcher read its creation cannot be looked at any more.
def steps(d):
    return [
        ("echo hello > f1", [("create", f"{d}/f1", None, None)]),
        ("echo more >> f1", [("open", f"{d}/f1", None, "w")]),
        ("chmod 600 f1", [("attr", f"{d}/f1", None, None)]),
        ("mv f1 f2", [("rename", f"{d}/f1", f"{d}/f2", None)]),
        # inotify watches a new directory only once it has read its creation: a rename
        # into it before that is seen as the directory's content (README, inotify)
        ("mkdir sub", [("mkdir", f"{d}/sub", None, None)]),
        ("mv f2 sub/f3", [("rename", f"{d}/f2", f"{d}/sub/f3", None)]),
        # moved out: the destination is not seen; moved in: the source is not seen
        ('mv sub/f3 "$OUT/f4"', [("rename", f"{d}/sub/f3", None, None)]),
        ('mv "$OUT/f4" f5', [("rename", None, f"{d}/f5", None)]),
        ("cat f5 > /dev/null", [("open", f"{d}/f5", None, "r")]),
        ("mkdir -p n1/n2/n3 && echo x > n1/n2/n3/new", [
            ("mkdir", f"{d}/n1", None, None),
            ("mkdir", f"{d}/n1/n2", None, None),
            ("mkdir", f"{d}/n1/n2/n3", None, None),
            ("create", f"{d}/n1/n2/n3/new", None, None)]),
        ("ln -s f5 link", [("symlink", f"{d}/link", None, None)]),
        ('touch "$OUT/unwatched"; chmod 600 "$OUT/unwatched"; rm "$OUT/unwatched"; '
         "rm f5 link", [("unlink", f"{d}/f5", None, None),
                        ("unlink", f"{d}/link", None, None)]),
        ("rm n1/n2/n3/new; rmdir n1/n2/n3 n1/n2 n1 sub", [
            ("unlink", f"{d}/n1/n2/n3/new", None, None),
            ("rmdir", f"{d}/n1/n2/n3", None, None),
            ("rmdir", f"{d}/n1/n2", None, None),
            ("rmdir", f"{d}/n1", None, None),
            ("rmdir", f"{d}/sub", None, None)]),
    ]


def expected(d):
    return [e for _, events in steps(d) for e in events]


ALIASES = {"create": ["fs-create"], "mkdir": ["fs-create"], "symlink": ["fs-create"],
           "rename": ["fs-create", "fs-remove"], "unlink": ["fs-remove"],
           "rmdir": ["fs-remove"], "attr": ["fs-attr"], "open": ["open"]}


@pytest.fixture
def dirs():
    base = tempfile.mkdtemp(prefix="fswa-inotify-", dir="/tmp")
    watched, out = os.path.join(base, "watched"), os.path.join(base, "outside")
    os.mkdir(watched)
    os.mkdir(out)
    for p in (base, watched, out):
        os.chown(p, UNPRIVILEGED_UID, UNPRIVILEGED_UID) if os.geteuid() == 0 else None
    yield watched, out
    shutil.rmtree(base)


def run_workload(watched, out, user=None):
    trace = Trace("--backend", "inotify", "-k", "demo", watched, user=user)
    done = 0
    for script, events in steps(watched):
        sh(f'OUT="{out}"\n' + script, cwd=watched, user=user)
        done += len(events)
        trace.wait_for(done)
    events, stderr, code = trace.stop()
    return events, stderr, code


def check(events, stderr, code, watched):
    assert code == 0, stderr
    got = [(e["op"], e.get("path"), e.get("path2"), e.get("access")) for e in events]
    assert got == expected(watched)
    for n, e in enumerate(events, 1):
        assert e["seq"] == n
        assert e["backend"] == "inotify"
        assert e["aliases"] == ALIASES[e["op"]]
        assert e["keys"] == ["demo"]
        assert e["time"] > 0
        for unknown in ("pid", "tid", "uid", "comm", "exe", "syscall", "result"):
            assert unknown not in e, f"inotify cannot know {unknown}"
    assert "watching 1 paths with inotify" in stderr
    assert "events lost: 0" in stderr
    for alias in ("fs-create", "fs-remove", "fs-attr", "open"):
        count = sum(alias in ALIASES[op] for op, *_ in expected(watched))
        assert f"{alias:<10} {count}\n" in stderr


def test_trace_inotify_exact_events(dirs):
    watched, out = dirs
    check(*run_workload(watched, out), watched)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_trace_inotify_unprivileged(dirs):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    watched, out = dirs
    check(*run_workload(watched, out, user=UNPRIVILEGED_UID), watched)


def test_trace_missing_path_is_refused(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "fswatchaudit", "trace", "--backend",
                        "inotify", str(tmp_path / "nope")], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 2
    assert f"path to watch does not exist: {tmp_path}/nope" in r.stderr


def test_overflow_is_counted(tmp_path):
    """A queue overflow is reported as lost events, not silently dropped."""
    from fswatchaudit.backends.inotify import InotifyBackend
    from fswatchaudit.rules import RuleSet, watch_rule
    with open("/proc/sys/fs/inotify/max_queued_events") as fh:
        limit = int(fh.read())
    rs = RuleSet()
    rs.add(watch_rule(str(tmp_path)))
    be = InotifyBackend(rs)
    be.start()
    try:
        a, b = tmp_path / "a", tmp_path / "b"
        a.write_text("")
        b.write_text("")
        for _ in range(limit // 2 + 10):
            os.chmod(a, 0o600)
            os.chmod(b, 0o600)   # alternate files: the kernel merges only repeats
        events = be.read(0.5)
        assert be.lost()["inotify_overflow"] >= 1
        assert len(events) < limit + 10
    finally:
        be.close()


def test_log_file_has_every_event_after_sigterm(dirs):
    """trace -o: SIGTERM flushes the buffered writer; the log holds what was printed."""
    import signal
    watched, out = dirs
    log = os.path.join(os.path.dirname(watched), "trace.log")
    trace = Trace("--backend", "inotify", "-o", log, watched)
    for i in range(50):
        open(os.path.join(watched, f"f{i}"), "w").close()
    trace.wait_for(50)
    printed, stderr, code = trace.stop(signal.SIGTERM)
    assert code == 0, stderr
    import json
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "fswatchaudit", "log", "show", "--json", log],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    logged = [rec for rec in records if rec["t"] == "ev"]
    assert logged == printed and len(logged) == 50
    # one serialised form: what trace printed and what the log holds are the same maps
    assert [r for r in records if r["t"] != "hdr"] == trace.records
    assert records[0]["t"] == "hdr" and records[0]["backend"] == "inotify"
    assert os.stat(log).st_mode & 0o777 == 0o600


def test_rules_check_prints_normalised_rules_and_names_bad_lines(tmp_path):
    import subprocess
    import sys
    good = tmp_path / "a.rules"
    good.write_text("# identity\n-w /etc/passwd -p wa -k passwd\n"
                    "-a exit,always -F dir=/srv -S fs-create -k srv\n")
    r = subprocess.run([sys.executable, "-m", "fswatchaudit", "rules", "check", str(good)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0
    assert r.stdout.splitlines() == [
        "-w /etc/passwd -p wa -k passwd",
        "-a always,exit -F arch=b64 -F dir=/srv -S fs-create -k srv"]
    bad = tmp_path / "b.rules"
    bad.write_text("-w /etc/group\n-a always,exit -F dir=/srv -S mkdri\n")
    r = subprocess.run([sys.executable, "-m", "fswatchaudit", "rules", "check", str(bad)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert f"{bad}:2: unknown syscall or alias 'mkdri' (did you mean 'mkdir'?)" in r.stderr
    assert r.stdout == ""


def unprivileged_trace_cmd(*args):
    """`fswatchaudit trace` as the unprivileged user: (command, cwd, env)."""
    import subprocess  # noqa: F401
    import sys

    from tracehelp import portable_copy, readable_by_others
    cmd = ["setpriv", f"--reuid={UNPRIVILEGED_UID}", f"--regid={UNPRIVILEGED_UID}",
           "--clear-groups", "--", sys.executable, "-m", "fswatchaudit", "trace", *args]
    if readable_by_others(REPO):
        return cmd, REPO, None
    cwd = portable_copy()
    cmd[cmd.index(sys.executable)] = "/usr/bin/python3"
    return cmd, cwd, dict(os.environ, PYTHONPATH=cwd)


needs_root_and_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to switch to an unprivileged user")


@needs_root_and_setpriv
def test_unprivileged_trace_skips_unreadable_directories_with_one_warning(dirs):
    watched, _ = dirs
    for name in ("secret", "secret2"):
        os.mkdir(os.path.join(watched, name), 0o700)      # root's, not readable
    os.makedirs(os.path.join(watched, "open", "locked"))
    os.chown(os.path.join(watched, "open"), UNPRIVILEGED_UID, UNPRIVILEGED_UID)
    os.chmod(os.path.join(watched, "open", "locked"), 0o700)
    trace = Trace("--backend", "inotify", "-k", "u", watched, user=UNPRIVILEGED_UID)
    sh("echo x > open/f", cwd=watched, user=UNPRIVILEGED_UID)
    trace.wait_for(1)
    events, stderr, code = trace.stop()
    assert code == 0, stderr
    assert "Traceback" not in stderr and "PermissionError" not in stderr
    warnings = [line for line in stderr.splitlines() if "not readable" in line]
    assert len(warnings) == 1, stderr
    for name in ("secret", "secret2", "open/locked"):
        assert os.path.join(watched, name) in warnings[0]
    assert [(e["op"], e["path"]) for e in events] == [("create", f"{watched}/open/f")]
    assert "not counted: 3 unreadable directories were not watched" in stderr


@needs_root_and_setpriv
def test_unprivileged_trace_of_etc_never_raises():
    trace = Trace("--backend", "inotify", "/etc", user=UNPRIVILEGED_UID)
    _, stderr, code = trace.stop()
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert sum("not readable" in line for line in stderr.splitlines()) <= 1


@needs_root_and_setpriv
def test_unprivileged_trace_of_an_unreadable_path_is_refused(dirs):
    import subprocess
    locked = os.path.join(os.path.dirname(dirs[0]), "locked")
    os.mkdir(locked, 0o700)                         # root's, in a directory all can read
    cmd, cwd, env = unprivileged_trace_cmd("--backend", "inotify", locked)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"cannot watch {locked}: permission denied" in r.stderr
    assert "Traceback" not in r.stderr
