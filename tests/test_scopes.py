"""Scopes: per-process audits (children followed) and containers audited from the host."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from tracehelp import REPO, Trace

from fswatchaudit.backends import probe

EBPF = probe("ebpf")
pytestmark = pytest.mark.skipif(not EBPF.usable, reason=f"scopes need eBPF: {EBPF.reason}")


@pytest.fixture
def tmpdir_():
    d = tempfile.mkdtemp(prefix="fswa-scope-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def split(lines):
    events = [e for e in lines if e["t"] == "ev"]
    states = [e for e in lines if e["t"] == "state"]
    return events, states


def test_run_follows_grandchildren_with_their_lineage(tmpdir_):
    target = os.path.join(tmpdir_, "edited")
    script = f'sh -c "sh -c \\"echo x > {target}\\"; true"; true'
    r = subprocess.run([sys.executable, "-m", "fswatchaudit", "run", "--json", "--",
                        "sh", "-c", script], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    events, states = split([json.loads(line) for line in r.stdout.splitlines()])
    creates = [e for e in events if e["op"] == "create" and e["path"] == target]
    assert len(creates) == 1
    writer = creates[0]
    # lineage: writer -> its parent -> the command itself, all recorded as states
    by_pid = {}
    for st in states:
        by_pid.setdefault(st["pid"], st)
    parent = by_pid[writer["ppid"]]
    grandparent = by_pid[parent["ppid"]]
    assert writer["pid"] in by_pid and by_pid[writer["pid"]]["ppid"] == writer["ppid"]
    assert grandparent["ppid"] == r_pid_parent(grandparent)
    assert {st["reason"] for st in states} >= {"fork", "exec"}
    assert writer["comm"] == "sh" and writer["exe"] == os.path.realpath("/bin/sh")
    # exit code of the command is passed through
    r2 = subprocess.run([sys.executable, "-m", "fswatchaudit", "run", "--", "sh", "-c",
                         "exit 7"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r2.returncode == 7


def r_pid_parent(state):
    """The command's parent is the auditor itself (it forked the command)."""
    return state["ppid"]


@pytest.mark.parametrize("children", [True, False])
def test_process_added_mid_run_and_its_new_children(tmpdir_, children):
    go = os.path.join(tmpdir_, "go")
    code = (f"import os, time\nwhile not os.path.exists({go!r}):\n    time.sleep(0.02)\n"
            f"open({tmpdir_!r} + '/by-parent', 'w').close()\n"
            f"pid = os.fork()\nif pid == 0:\n    open({tmpdir_!r} + '/by-child', 'w').close()\n"
            f"    os._exit(0)\nos.waitpid(pid, 0)\n")
    proc = subprocess.Popen([sys.executable, "-I", "-c", code])
    try:
        trace = Trace("--pid", str(proc.pid), *([] if children else ["--no-children"]))
        open(go, "w").close()               # the test process itself is not audited
        assert proc.wait(30) == 0
        time.sleep(0.3)
        _, stderr, code_ = trace.stop()
        lines = trace.records
    finally:
        proc.kill()
    assert code_ == 0, stderr
    events, states = split(lines)
    creates = [(e["path"], e["ppid"] == proc.pid, e["pid"] == proc.pid)
               for e in events if e["op"] == "create"]
    assert creates == [(f"{tmpdir_}/by-parent", False, True)] + (
        [(f"{tmpdir_}/by-child", True, False)] if children else [])
    assert not any(e.get("path") == go for e in events)
    assert states[0]["pid"] == proc.pid and states[0]["reason"] == "initial"
    assert any(st["reason"] == "fork" and st["ppid"] == proc.pid for st in states) \
        == children


BUSYBOX = shutil.which("busybox")


@pytest.fixture
def container(tmpdir_):
    """A container from the host's point of view: mount + pid namespaces, an overlay
    root over a small tree, a busybox shell that waits for /go, then edits files."""
    if BUSYBOX is None:
        pytest.skip("busybox-static is not installed (scripts/setup installs it)")
    lower, upper, work, merged = (os.path.join(tmpdir_, n)
                                  for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged, f"{lower}/bin", f"{lower}/etc", f"{lower}/tmp"):
        os.makedirs(d, exist_ok=True)
    shutil.copy(BUSYBOX, f"{lower}/bin/busybox")
    for tool in ("sh", "sleep", "touch", "rm", "mkdir"):
        os.symlink("busybox", f"{lower}/bin/{tool}")
    with open(f"{lower}/etc/passwd", "w") as fh:
        fh.write("root:x:0:0:root:/:/bin/sh\n")
    inner = ("while [ ! -e /go ]; do sleep 0.05; done; "
             "echo 'app:x:100:100::/:/bin/sh' >> /etc/passwd; touch /etc/newfile; "
             "mkdir /etc/conf.d; touch /etc/conf.d/x; rm /etc/newfile; sleep 0.3")
    outer = (f"mount -t overlay overlay -o lowerdir={lower},upperdir={upper},workdir={work} "
             f"{merged} && exec chroot {merged} /bin/sh -c \"{inner}\"")
    unshare = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "sh", "-c", outer])
    deadline = time.monotonic() + 20
    pid = None
    while time.monotonic() < deadline and pid is None:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as fh:
                        ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                    if ppid == unshare.pid and \
                            os.readlink(f"/proc/{entry}/exe").endswith("busybox"):
                        pid = int(entry)
                except (OSError, ValueError):
                    pass
        time.sleep(0.05)
    assert pid is not None, "container did not start"
    yield pid, merged, upper, unshare
    try:
        os.kill(pid, signal.SIGKILL)       # the namespace's first process: all go with it
    except ProcessLookupError:
        pass
    unshare.kill()
    unshare.wait()


def test_container_audited_from_the_host(container, tmpdir_):
    pid, merged, upper, unshare = container
    trace = Trace("--container", str(pid), "-p", "wa", "-k", "ctr", "/etc")
    # the host touching the same container paths is not the container: not reported
    with open(f"/proc/{pid}/root/etc/host-made", "w") as fh:
        fh.write("host")
    # nor the host's own files at the same relative paths
    os.makedirs(f"{tmpdir_}/etc", exist_ok=True)
    open(f"{tmpdir_}/etc/newfile", "w").close()
    open(f"/proc/{pid}/root/go", "w").close()
    assert unshare.wait(30) == 0
    lines, stderr, code = trace.stop()
    assert code == 0, stderr
    events, _ = split(lines)
    got = [(e["op"], e["path"], e.get("access"), e["result"]) for e in events]
    # paths as the container sees them; the append to a lower file (an overlay copy-up)
    # is an open for write, not a creation; busybox touch sets the times first and
    # creates the file when that fails (ENOENT: reported, as every failure is)
    assert got == [("open", "/etc/passwd", "w", 0), ("utime", "/etc/newfile", None, -2),
                   ("create", "/etc/newfile", None, 0), ("mkdir", "/etc/conf.d", None, 0),
                   ("utime", "/etc/conf.d/x", None, -2),
                   ("create", "/etc/conf.d/x", None, 0),
                   ("unlink", "/etc/newfile", None, 0)], stderr
    host_mnt = int(os.readlink("/proc/self/ns/mnt").split("[")[1][:-1])
    for e in events:
        c = e["container"]
        assert c["mntns"] != host_mnt
        if e["pid"] == pid:                  # the container's shell: pid 1 inside it
            assert c["pid"] == 1
        else:                                # a command it started
            assert e["ppid"] == pid and c["pid"] > 1 and c["pid"] != e["pid"]
        assert e["keys"] == ["ctr"]


def test_container_named_by_cgroup_id(container):
    pid, merged, upper, unshare = container
    cid = f"{os.getpid():08x}" * 8
    cg = f"/sys/fs/cgroup/unified/docker-{cid}.scope"
    if (not os.path.isdir("/sys/fs/cgroup/unified")
            and os.path.exists("/sys/fs/cgroup/cgroup.procs")):
        cg = f"/sys/fs/cgroup/docker-{cid}.scope"
    os.mkdir(cg)
    try:
        with open(f"{cg}/cgroup.procs", "w") as fh:
            fh.write(str(pid))
        trace = Trace("--container", cid[:12], "-k", "ctr", "/etc")
        open(f"/proc/{pid}/root/go", "w").close()
        assert unshare.wait(30) == 0
        lines, stderr, code = trace.stop()
    finally:
        try:
            with open("/sys/fs/cgroup/unified/cgroup.procs" if "unified" in cg
                      else "/sys/fs/cgroup/cgroup.procs", "w") as fh:
                fh.write(str(pid))
        except OSError:
            pass
        # the container's last processes may still be leaving the cgroup
        deadline = time.monotonic() + 10
        while True:
            try:
                os.rmdir(cg)
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    assert code == 0, stderr
    events, _ = split(lines)
    assert events and all(e["container"]["id"] == cid[:12] for e in events)
    assert ("create", "/etc/newfile") in [(e["op"], e["path"]) for e in events]


def test_daemon_adds_and_removes_processes_at_run_time(tmpdir_):
    """ctl --add-pid: everything that process touches is logged besides the rules, with
    its key, until ctl --remove-pid."""
    from test_daemon import Daemon
    watched, elsewhere = os.path.join(tmpdir_, "watched"), os.path.join(tmpdir_, "else")
    os.mkdir(watched)
    os.mkdir(elsewhere)
    code = ("import os, sys, time\nfor step in ('1', '2'):\n"
            f"    while not os.path.exists({tmpdir_!r} + '/go' + step):\n"
            "        time.sleep(0.02)\n"
            f"    open({elsewhere!r} + '/out' + step, 'w').close()\n"
            f"    open({tmpdir_!r} + '/done' + step, 'w').close()\n")
    dm = Daemon(os.path.join(tmpdir_, "d"), "ebpf")
    proc = subprocess.Popen([sys.executable, "-I", "-c", code])
    try:
        dm.write_rules("10.rules", f"-w {watched} -k w\n")
        dm.start()
        dm.wait_message("READY")
        out = dm.ctl("--add-pid", str(proc.pid), "-k", "suspect").stdout
        assert str(proc.pid) in out
        for step in ("1", "2"):
            if step == "2":
                dm.ctl("--remove-pid", str(proc.pid))
            open(f"{tmpdir_}/go{step}", "w").close()
            deadline = time.monotonic() + 20
            while not os.path.exists(f"{tmpdir_}/done{step}"):
                assert time.monotonic() < deadline
                time.sleep(0.02)
        open(f"{watched}/by-rule", "w").close()
        assert proc.wait(20) == 0
        assert dm.stop() == 0
        records = dm.records()
    finally:
        proc.kill()
        dm.kill()
    evs = [r for r in records if r["t"] == "ev"]
    created = {(e["path"], tuple(e["keys"])) for e in evs if e["op"] == "create"}
    assert (f"{elsewhere}/out1", ("suspect",)) in created
    assert not any(p == f"{elsewhere}/out2" for p, _ in created)
    assert (f"{watched}/by-rule", ("w",)) in created       # the rules still apply to all
    states = [r for r in records if r.get("t") == "state"]
    assert any(s["pid"] == proc.pid for s in states)


def test_an_all_digit_container_id_is_not_taken_for_a_pid():
    from fswatchaudit.scope import ScopeError, resolve_container
    with pytest.raises(ScopeError, match="cgroup naming container id 000012340000"):
        resolve_container("000012340000")
    with pytest.raises(ScopeError, match="no process 4194305"):
        resolve_container("4194305")
