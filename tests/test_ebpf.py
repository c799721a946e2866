"""The eBPF backend: real programs loaded into the running kernel, real file operations."""
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest
from tracehelp import REPO, Trace, drain

from fswatchaudit.backends import probe
from fswatchaudit.rules import RuleSet, parse_line, watch_rule

EBPF = probe("ebpf")
pytestmark = pytest.mark.skipif(not EBPF.usable, reason=f"eBPF backend: {EBPF.reason}")
PY = os.path.realpath(sys.executable)
NOBODY = 65534


def backend_for(*rules, **kw):
    """A started backend.  Unless told otherwise it also reports this test process's own
    file operations (the product excludes its own process)."""
    from fswatchaudit.backends.ebpf import EbpfBackend
    kw.setdefault("exclude_self", False)
    rs = RuleSet()
    for r in rules:
        rs.add(r if not isinstance(r, str) else parse_line(r).rule)
    be = EbpfBackend(rs, **kw)
    be.start()
    return be


def py(code, cwd, user=None):
    """Run Python code in a new process; returns its pid."""
    cmd = [PY, "-I", "-c", code]   # -I: imports never look in the (watched) cwd
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--", *cmd]
    proc = subprocess.Popen(cmd, cwd=cwd)
    assert proc.wait(30) == 0
    return proc.pid


@pytest.fixture
def tree():
    base = tempfile.mkdtemp(prefix="fswa-ebpf-", dir="/tmp")
    os.chmod(base, 0o755)
    w, o = os.path.join(base, "w"), os.path.join(base, "o")
    os.makedirs(os.path.join(w, "deep", "er"))
    os.mkdir(o)
    yield w, o
    shutil.rmtree(base)


def ops(events):
    return [(e.op, e.path, e.path2) for e in events]


OPERATIONS = [
    # (code run in W/deep/er, expected op, path, path2, syscall, extra checks)
    ("open('f', 'w').close()", "create", "f", None, "openat"),
    ("import ctypes; ctypes.CDLL(None).creat(b'c', 0o644)", "create", "c", None, "creat"),
    ("open('f', 'a').close()", "open", "f", None, "openat"),
    ("open('f').close()", "open", "f", None, "openat"),
    ("import os; os.mkdir('d')", "mkdir", "d", None, "mkdir"),
    ("import os; os.mkfifo('p')", "mknod", "p", None, "mknodat"),
    ("import os; os.symlink('f', 's')", "symlink", "s", None, "symlink"),
    ("import os; os.link('f', 'l')", "link", "f", "l", "link"),
    ("import os; os.rename('l', 'm')", "rename", "l", "m", "rename"),
    ("import os; os.chmod('f', 0o600)", "chmod", "f", None, "chmod"),
    ("import os; os.chown('f', 1, 1)", "chown", "f", None, "chown"),
    ("import os; os.setxattr('f', 'user.k', b'v')", "setxattr", "f", None, "setxattr"),
    ("import os; os.removexattr('f', 'user.k')", "removexattr", "f", None, "removexattr"),
    ("import os; os.truncate('f', 5)", "truncate", "f", None, "truncate"),
    ("import os; os.utime('f', (1, 1))", "utime", "f", None, "utimensat"),
    ("import os; os.unlink('m')", "unlink", "m", None, "unlink"),
    ("import os; os.rmdir('d')", "rmdir", "d", None, "rmdir"),
]


def test_every_operation_in_a_subtree_and_nothing_outside(tree):
    w, o = tree
    be = backend_for(watch_rule(w, key="k"))
    try:
        cwd = os.path.join(w, "deep", "er")
        for code, op, name, name2, syscall in OPERATIONS:
            pid = py(code, cwd)
            got = drain(be)
            assert len(got) == 1, f"{code}: {got}"
            ev = got[0]
            want_access = {"open('f', 'a').close()": "w", "open('f').close()": "r"}.get(code)
            assert (ev.op, ev.path, ev.path2, ev.syscall, ev.result, ev.access) == (
                op, f"{cwd}/{name}", f"{cwd}/{name2}" if name2 else None, syscall, 0,
                want_access), code
            assert (ev.pid, ev.tid, ev.ppid) == (pid, pid, os.getpid())
            assert (ev.uid, ev.euid, ev.gid) == (0, 0, 0)
            assert ev.loginuid == int(open("/proc/self/loginuid").read())
            assert ev.comm == "python3" or ev.comm.startswith("python")
            assert ev.exe == PY
            assert ev.keys == ["k"]
            assert ev.ino and ev.dev
        # exec of a program inside the tree
        prog = os.path.join(w, "prog")
        shutil.copy("/bin/true", prog)
        drain(be)
        proc = subprocess.Popen([prog])
        proc.wait()
        got = drain(be)
        assert [(e.op, e.path, e.pid, e.comm, e.exe) for e in got] == [
            ("exec", prog, proc.pid, "prog", prog)]
        # outside: no event, and nothing even submitted to the ring buffer
        before = be.submitted()
        py("import os; open('x', 'w').close(); os.chmod('x', 0o600); os.rename('x', 'y');"
           "os.unlink('y'); os.mkdir('d'); os.rmdir('d')", o)
        assert drain(be) == []
        assert be.submitted() == before
        assert be.lost()["ringbuf"] == 0
    finally:
        be.close()


def test_nested_mkdir_then_create_has_no_race(tree):
    w, _ = tree
    be = backend_for(watch_rule(w))
    try:
        subprocess.run(["sh", "-c", "mkdir -p a/b/c && echo x > a/b/c/f"], cwd=w, check=True)
        # mkdir -p also opens each directory it made, to make the next one inside it
        assert ops(e for e in drain(be) if e.op != "open") == [
            ("mkdir", f"{w}/a", None), ("mkdir", f"{w}/a/b", None), ("mkdir", f"{w}/a/b/c", None),
            ("create", f"{w}/a/b/c/f", None)]
    finally:
        be.close()


def test_directory_moved_in_is_covered_moved_out_is_not(tree):
    w, o = tree
    os.makedirs(f"{o}/d/sub")
    be = backend_for(watch_rule(w))
    try:
        # the kernel has judged sub (not watched) before the move: that verdict must go
        open(f"{o}/d/sub/before", "w").close()
        os.rename(f"{o}/d", f"{w}/d")
        open(f"{w}/d/sub/x", "w").close()
        os.rename(f"{w}/d", f"{o}/d2")
        open(f"{o}/d2/sub/y", "w").close()
        os.rename(f"{o}/d2", f"{w}/d3")                # a move without a rename of sub
        os.chmod(f"{w}/d3/sub/x", 0o600)
        assert ops(drain(be)) == [("rename", f"{o}/d", f"{w}/d"),
                                  ("create", f"{w}/d/sub/x", None),
                                  ("rename", f"{w}/d", f"{o}/d2"),
                                  ("rename", f"{o}/d2", f"{w}/d3"),
                                  ("chmod", f"{w}/d3/sub/x", None)]
    finally:
        be.close()


def test_removed_directory_and_new_watches_are_judged_afresh(tree):
    w, o = tree
    os.makedirs(f"{o}/sub")
    be = backend_for(watch_rule(w, key="w"))
    try:
        open(f"{o}/sub/a", "w").close()               # sub judged: not watched
        rule = watch_rule(o, key="o")
        be.add_rule(be.rules.add(rule), rule)
        open(f"{o}/sub/b", "w").close()               # watched now
        assert ops(drain(be)) == [("create", f"{o}/sub/b", None)]
        be.remove_rule(be.rules.remove(rule), rule)
        before = be.submitted()
        open(f"{o}/sub/c", "w").close()               # not any more
        # directories removed and made again (inode numbers are reused) are new places:
        # nothing judged under the watch may stick to a directory made outside it
        for i in range(20):
            os.mkdir(f"{w}/n{i}")
            open(f"{w}/n{i}/f", "w").close()
            os.unlink(f"{w}/n{i}/f")
            os.rmdir(f"{w}/n{i}")
            os.mkdir(f"{o}/m{i}")
            open(f"{o}/m{i}/f", "w").close()
        assert ops(drain(be)) == [x for i in range(20) for x in (
            ("mkdir", f"{w}/n{i}", None), ("create", f"{w}/n{i}/f", None),
            ("unlink", f"{w}/n{i}/f", None), ("rmdir", f"{w}/n{i}", None))]
        assert be.submitted() - before == 20 * 4     # the kernel sent nothing else
    finally:
        be.close()


def test_paths_are_absolute_for_relative_and_dirfd_calls(tree):
    w, _ = tree
    be = backend_for(watch_rule(w))
    try:
        py("import os\nos.chdir('deep')\nopen('er/rel', 'w').close()\n"
           "fd = os.open('er', os.O_RDONLY | os.O_DIRECTORY)\n"
           "os.mkdir('viafd', dir_fd=fd)\nos.rename('viafd', '../top', src_dir_fd=fd)\n"
           "os.chmod('er/rel', 0o600)", w)
        assert ops(drain(be)) == [
            ("create", f"{w}/deep/er/rel", None), ("open", f"{w}/deep/er", None),
            ("mkdir", f"{w}/deep/er/viafd", None),
            ("rename", f"{w}/deep/er/viafd", f"{w}/top"),
            ("chmod", f"{w}/deep/er/rel", None)]
    finally:
        be.close()


def test_file_watch_survives_replacement_and_waits_for_creation(tree):
    w, _ = tree
    target = f"{w}/config"
    later = f"{w}/later"
    open(target, "w").write("v1")
    be = backend_for(watch_rule(target, key="cfg"), watch_rule(later, key="later"))
    try:
        open(f"{w}/sibling", "w").close()            # not watched
        open(f"{w}/.config.tmp", "w").write("v2")
        os.rename(f"{w}/.config.tmp", target)         # editor-style replace
        os.chmod(target, 0o600)                       # the new file is watched too
        open(later, "w").close()                      # created after the watch
        os.chmod(later, 0o600)
        got = drain(be)
        assert [(e.op, e.path, e.path2, e.keys) for e in got] == [
            ("rename", f"{w}/.config.tmp", target, ["cfg"]),
            ("chmod", target, None, ["cfg"]),
            ("create", later, None, ["later"]),
            ("chmod", later, None, ["later"])]
    finally:
        be.close()


def test_permission_filters(tree):
    w, _ = tree
    open(f"{w}/f", "w").close()
    shutil.copy("/bin/true", f"{w}/prog")
    rules = [parse_line(f"-a always,exit -F dir={w} -F perm={p} -k {p}").rule for p in "rwxa"]
    be = backend_for(*rules)
    try:
        open(f"{w}/f").close()
        open(f"{w}/f", "a").close()
        subprocess.run([f"{w}/prog"], check=True)
        os.chmod(f"{w}/f", 0o600)
        os.unlink(f"{w}/f")
        got = drain(be)
        assert [(e.op, e.keys) for e in got] == [
            ("open", ["r"]), ("open", ["w"]), ("exec", ["x"]), ("chmod", ["a", "w"]),
            ("unlink", ["w"])]
    finally:
        be.close()


def test_short_lived_process_is_attributed(tree):
    w, _ = tree
    open(f"{w}/f", "w").close()
    be = backend_for(watch_rule(w))
    try:
        proc = subprocess.Popen(["chmod", "600", f"{w}/f"])
        proc.wait()
        time.sleep(0.2)          # the process is gone well before the event is read
        got = drain(be)
        assert [(e.op, e.pid, e.comm, e.exe) for e in got] == [
            ("chmod", proc.pid, "chmod", shutil.which("chmod"))]
    finally:
        be.close()


def test_failed_attempt_by_unprivileged_user(tree):
    w, _ = tree
    os.mkdir(f"{w}/locked", 0o755)
    be = backend_for(watch_rule(w))
    try:
        py("try:\n    open('locked/f', 'w')\nexcept PermissionError:\n    pass", w, user=NOBODY)
        got = drain(be)
        assert [(e.op, e.path, e.result, e.uid) for e in got] == [
            ("create", f"{w}/locked/f", -13, NOBODY)]
    finally:
        be.close()


def test_rules_change_at_run_time_without_reload(tree):
    from fswatchaudit.auditor import Auditor
    from fswatchaudit.sinks import ListSink
    w, o = tree
    be = backend_for(watch_rule(w, key="w"))
    seen = ListSink()
    aud = Auditor(be, be.rules, [seen])
    try:
        bpf = be.bpf
        aud.apply([parse_line(f"-w {o} -k o")])
        open(f"{o}/a", "w").close()
        open(f"{w}/a", "w").close()
        aud.apply([parse_line(f"-W {w} -k w")])
        open(f"{w}/b", "w").close()
        open(f"{o}/b", "w").close()
        aud.poll_once(0.5)
        aud.poll_once(0.3)
        assert be.bpf is bpf          # the same loaded programs
        assert [(e.op, e.path, e.keys) for e in seen.events] == [
            ("create", f"{o}/a", ["o"]), ("create", f"{w}/a", ["w"]),
            ("create", f"{o}/b", ["o"])]
    finally:
        be.close()


def test_ring_buffer_overflow_is_counted_and_never_blocks(tree):
    w, _ = tree
    be = backend_for(watch_rule(w), queue_size=8192)   # 2 pages: a few records
    try:
        # nobody reads while the workload runs: the kernel must drop and count
        py("import os\nfor i in range(2000):\n    os.chmod('.', 0o755 if i % 2 else 0o700)",
           w)
        got = drain(be)
        lost = be.lost()["ringbuf"]
        assert lost > 0
        assert len(got) + lost == 2000
    finally:
        be.close()


IO_URING_C = r"""
#include <liburing.h>
#include <fcntl.h>
#include <stdio.h>
int main(int argc, char **argv) {
    struct io_uring ring;
    if (io_uring_queue_init(4, &ring, 0)) return 2;
    struct io_uring_sqe *sqe; struct io_uring_cqe *cqe;
    sqe = io_uring_get_sqe(&ring); io_uring_prep_mkdirat(sqe, AT_FDCWD, argv[1], 0755);
    io_uring_submit(&ring); io_uring_wait_cqe(&ring, &cqe);
    if (cqe->res) return 3; io_uring_cqe_seen(&ring, cqe);
    sqe = io_uring_get_sqe(&ring); io_uring_prep_unlinkat(sqe, AT_FDCWD, argv[2], 0);
    io_uring_submit(&ring); io_uring_wait_cqe(&ring, &cqe);
    if (cqe->res) return 4; io_uring_cqe_seen(&ring, cqe);
    return 0;
}
"""


@pytest.fixture(scope="module")
def uring_prog(tmp_path_factory):
    if not os.path.exists("/usr/include/liburing.h"):
        pytest.skip("liburing-dev is not installed (scripts/setup installs it)")
    d = tmp_path_factory.mktemp("uring")
    (d / "u.c").write_text(IO_URING_C)
    subprocess.run(["gcc", "-O2", "-o", str(d / "u"), str(d / "u.c"), "-luring"], check=True)
    return str(d / "u")


def test_io_uring_operations_are_reported(tree, uring_prog):
    w, _ = tree
    open(f"{w}/victim", "w").close()
    be = backend_for(watch_rule(w), exclude_self=True)   # naming a new entry reads the dir
    try:
        proc = subprocess.Popen([uring_prog, f"{w}/newdir", f"{w}/victim"])
        assert proc.wait() == 0
        got = drain(be)
        assert [(e.op, e.path, e.pid) for e in got] == [
            ("mkdir", f"{w}/newdir", proc.pid), ("unlink", f"{w}/victim", proc.pid)]
    finally:
        be.close()


def test_trace_cli_reports_other_processes_and_auto_picks_ebpf(tree):
    w, _ = tree
    out = subprocess.run([sys.executable, "-m", "fswatchaudit", "backends"], cwd=REPO,
                         capture_output=True, text=True)
    assert "ebpf       yes" in out.stdout and "(auto picks this)" in out.stdout.split("\n")[1]
    trace = Trace("--backend", "auto", "-k", "t", w)
    subprocess.run(["sh", "-c", "echo hi > made; chmod 600 made; rm made"], cwd=w, check=True)
    trace.wait_for(3)
    events, stderr, code = trace.stop()
    assert code == 0, stderr
    assert "with ebpf" in stderr and "events lost: 0" in stderr
    assert [(e["op"], e["path"], e["comm"]) for e in events] == [
        ("create", f"{w}/made", "sh"), ("chmod", f"{w}/made", "chmod"),
        ("unlink", f"{w}/made", "rm")]


def test_inode_rule_on_a_file(tree):
    w, o = tree
    target = f"{o}/byinode"
    open(target, "w").close()
    open(f"{o}/other", "w").close()
    st = os.stat(target)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    be = backend_for(f"-a always,exit -F inode={st.st_ino} -F dev={dev} -F perm=wa -k ino")
    try:
        os.chmod(f"{o}/other", 0o600)                 # same directory, another inode
        os.chmod(target, 0o600)
        os.truncate(target, 3)
        assert [(e.op, e.path, e.ino, e.keys) for e in drain(be)] == [
            ("chmod", target, st.st_ino, ["ino"]), ("truncate", target, st.st_ino, ["ino"])]
    finally:
        be.close()


INT80_C = r"""
#include <stdio.h>
/* mkdir(argv[1]), symlink("t", argv[2]), chmod(argv[1]) through the 32-bit syscall
 * entry: i386 numbers 39, 83, 15 (in the 64-bit table: getpid, mkdir, rt_sigreturn).
 * Buffers are static so that their addresses fit in 32 bits (built with -no-pie). */
static char dir[256], link[256], target[] = "t";
static long sys32(long nr, long a, long b) {
    long ret;
    asm volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b) : "memory");
    return ret;
}
int main(int argc, char **argv) {
    snprintf(dir, sizeof dir, "%s", argv[1]);
    snprintf(link, sizeof link, "%s", argv[2]);
    if (sys32(39, (long)dir, 0755) || sys32(83, (long)target, (long)link) ||
        sys32(15, (long)dir, 0700))
        return 3;
    return 0;
}
"""


def test_32bit_syscalls_are_judged_by_their_own_table(tree, tmp_path):
    w, _ = tree
    if os.uname().machine != "x86_64":
        pytest.skip("the helper uses the x86 32-bit syscall entry")
    (tmp_path / "int80.c").write_text(INT80_C)
    subprocess.run(["gcc", "-O2", "-no-pie", "-o", str(tmp_path / "int80"),
                    str(tmp_path / "int80.c")], check=True)
    be = backend_for(watch_rule(w))
    try:
        proc = subprocess.run([str(tmp_path / "int80"), f"{w}/d32", f"{w}/l32"])
        if proc.returncode != 0:
            pytest.skip("no 32-bit syscall entry (CONFIG_IA32_EMULATION off)")
        assert os.readlink(f"{w}/l32") == "t"
        got = drain(be)
        assert [(e.op, e.path, e.syscall, e.result) for e in got] == [
            ("mkdir", f"{w}/d32", "mkdir", 0), ("symlink", f"{w}/l32", "symlink", 0),
            ("chmod", f"{w}/d32", "chmod", 0)]
        assert "compat_syscalls" not in be.lost()
    finally:
        be.close()


def test_trace_mounts_tracefs_when_it_is_not_mounted(tree):
    """A fresh host: no tracefs mount.  The backend mounts it itself (here in a private
    mount namespace, so the host's mount is left alone) and says so once."""
    w, _ = tree
    script = ("umount /sys/kernel/tracing; umount /sys/kernel/debug/tracing 2>/dev/null; "
              "test -d /sys/kernel/tracing/events && exit 97; exec \"$@\"")
    out = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         sys.executable, "-m", "fswatchaudit", "trace", "--backend", "ebpf", "--json",
         "--duration", "60", w],
        stdout=out, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        err = []
        for line in proc.stderr:
            err.append(line)
            if line.startswith("watching "):
                break
        else:
            pytest.fail("trace exited before watching:\n" + "".join(err))
        subprocess.run(["sh", "-c", "echo hi > made"], cwd=w, check=True)
        deadline = time.monotonic() + 20
        while b"\n" not in (events := open(f"/proc/self/fd/{out.fileno()}", "rb").read()):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(err)
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGINT)
        err += proc.stderr.read()
        proc.wait(30)
    assert sum("mounted tracefs" in line for line in err) == 1, "".join(err)
    first = json.loads(events.splitlines()[0])
    assert (first["op"], first["path"], first["comm"]) == ("create", f"{w}/made", "sh")
    # the host's own tracefs mount was not touched
    assert os.path.isdir("/sys/kernel/tracing/events")


# -- no evasion (issue 11): the kernel's inode verdict decides, names are for display ----

def test_file_watch_reports_removal_with_the_files_own_inode(tree):
    w, _ = tree
    target = f"{w}/passwd"
    open(target, "w").close()
    ino = os.stat(target).st_ino
    open(f"{w}/sibling", "w").close()
    be = backend_for(watch_rule(target, perms="wa", key="pw"))
    try:
        subprocess.run(["rm", f"{w}/sibling"], check=True)     # another entry: not reported
        proc = subprocess.run(["rm", target], check=True)
        got = drain(be)
        assert [(e.op, e.path, e.ino, e.keys, e.comm) for e in got] == [
            ("unlink", target, ino, ["pw"], "rm")]
        assert proc.returncode == 0
    finally:
        be.close()


def test_removal_records_name_the_removed_object(tree):
    w, _ = tree
    os.mkdir(f"{w}/d")
    open(f"{w}/f", "w").close()
    inos = {n: os.stat(f"{w}/{n}").st_ino for n in ("d", "f")}
    be = backend_for(watch_rule(w))
    try:
        os.unlink(f"{w}/f")
        os.rmdir(f"{w}/d")
        got = drain(be)
        assert [(e.op, e.path, e.ino) for e in got] == [
            ("unlink", f"{w}/f", inos["f"]), ("rmdir", f"{w}/d", inos["d"])]
    finally:
        be.close()


def test_write_and_chmod_through_a_hard_link_in_an_unwatched_directory(tree):
    w, o = tree
    target = f"{w}/secret"
    open(target, "w").close()
    os.link(target, f"{o}/alias")                 # before the watch: not reported
    ino = os.stat(target).st_ino
    be = backend_for(watch_rule(target, perms="wa", key="s"))
    try:
        py("open('alias', 'a').write('x')\nimport os\nos.chmod('alias', 0o600)", o)
        got = drain(be)
        assert [(e.op, e.path, e.access, e.ino, e.keys) for e in got] == [
            ("open", f"{o}/alias", "w", ino, ["s"]), ("chmod", f"{o}/alias", None, ino, ["s"])]
    finally:
        be.close()


def test_a_file_with_more_names_than_the_kernel_judges_is_reported_or_counted(tree):
    """The kernel judges a changed file by its first 4 names (the newest links first);
    a watched name beyond them is not judged, and that is counted, never silent."""
    w, o = tree
    target = f"{w}/secret"
    open(target, "w").close()
    for n in range(5):                            # newer names, all unwatched
        os.link(target, f"{o}/alias{n}")
    be = backend_for(watch_rule(w, perms="wa", key="s"))
    try:
        py("import os\nos.chmod('alias0', 0o600)", o)
        got = drain(be)
        # newest names first: the watched one is the sixth, so it is counted
        assert got == [] and be.lost().get("too_many_names") == 1, (got, be.lost())
    finally:
        be.close()


def test_create_and_chmod_through_a_bind_mount_of_a_watched_directory(tree):
    w, o = tree
    open(f"{w}/f", "w").close()
    view = f"{o}/view"
    os.mkdir(view)
    subprocess.run(["mount", "--bind", w, view], check=True)
    try:
        be = backend_for(watch_rule(w, key="w"))
        try:
            py("import os\nopen('view/new', 'w').close()\nos.chmod('view/f', 0o600)\n"
               "os.mkdir('view/d')", o)
            got = drain(be)
            assert [(e.op, e.path, e.keys) for e in got] == [
                ("create", f"{view}/new", ["w"]), ("chmod", f"{view}/f", ["w"]),
                ("mkdir", f"{view}/d", ["w"])]
        finally:
            be.close()
    finally:
        subprocess.run(["umount", view], check=True)


def test_a_watched_tree_renamed_away_and_back_still_reports_changes_inside(tree):
    w, o = tree
    open(f"{w}/deep/er/f", "w").close()
    be = backend_for(watch_rule(w, key="w"))
    try:
        away = f"{o}/away"
        os.rename(w, away)
        os.chmod(f"{away}/deep/er/f", 0o600)
        open(f"{away}/new", "w").close()
        os.rename(away, w)
        got = drain(be)
        assert [(e.op, e.path, e.path2, e.keys) for e in got] == [
            ("rename", w, away, ["w"]), ("chmod", f"{away}/deep/er/f", None, ["w"]),
            ("create", f"{away}/new", None, ["w"]), ("rename", away, w, ["w"])]
    finally:
        be.close()


def test_keys_come_from_the_rules_the_kernel_matched(tree):
    w, o = tree
    open(f"{w}/deep/er/f", "w").close()
    os.link(f"{w}/deep/er/f", f"{o}/alias")
    be = backend_for(watch_rule(w, key="tree"), watch_rule(f"{w}/deep/er/f", key="file"),
                     parse_line(f"-a always,exit -F dir={w}/deep -S chmod -k deep").rule)
    try:
        os.chmod(f"{w}/deep/er/f", 0o600)          # all three
        os.truncate(f"{o}/alias", 0)               # through a link elsewhere: its names count
        os.chmod(f"{w}/deep", 0o700)               # the tree and the deep chmod rule
        # (read opens of the tree by other processes of the host may come too)
        got = [e for e in drain(be) if e.op != "open"]
        assert [(e.op, e.path, e.keys) for e in got] == [
            ("chmod", f"{w}/deep/er/f", ["deep", "file", "tree"]),
            ("truncate", f"{o}/alias", ["file", "tree"]),
            ("chmod", f"{w}/deep", ["deep", "tree"])]
    finally:
        be.close()


def test_a_filesystem_mounted_inside_a_watched_directory_is_covered(tree):
    w, _ = tree
    be = backend_for(watch_rule(w, key="w"))
    mnt = f"{w}/mnt"
    os.mkdir(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "none", mnt], check=True)   # after the start
    try:
        drain(be)
        py("import os\nos.mkdir('d')\nos.chmod('d', 0o700)\nos.rename('d', 'e')\n"
           "open('e/f', 'w').close()\nos.unlink('e/f')\nos.rmdir('e')", mnt)
        got = drain(be)
        assert [(e.op, e.path, e.keys) for e in got] == [
            ("mkdir", f"{mnt}/d", ["w"]), ("chmod", f"{mnt}/d", ["w"]),
            ("rename", f"{mnt}/d", ["w"]), ("create", f"{mnt}/e/f", ["w"]),
            ("unlink", f"{mnt}/e/f", ["w"]), ("rmdir", f"{mnt}/e", ["w"])]
    finally:
        subprocess.run(["umount", mnt], check=True)
        be.close()


FAILING = """
import os
def fails(f, *a):
    try:
        f(*a)
    except OSError:
        return
    raise SystemExit(f'{f.__name__}{a}: no error')
fails(os.mkdir, 'd')                        # EEXIST
fails(os.unlink, 'nothere')                 # ENOENT
fails(os.rmdir, 'd')                        # ENOTEMPTY
fails(os.rename, 'd/x', '/dev/shm/fswa-x')  # EXDEV
fails(os.link, 'd/x', '/dev/shm/fswa-x')    # EXDEV
fails(open, 'nothere')                      # ENOENT, a read open
fails(os.mkdir, os.getcwd() + '/d')         # EEXIST, absolute
fails(os.chmod, os.getcwd() + 'x/f', 0o600) # ENOENT: a sibling sharing the prefix
fails(os.unlink, '%(w)s/./nothere')         # ENOENT: names resolved as user space does
fails(os.unlink, '%(w)s/d/.././nothere/')
"""


def test_failed_operations_are_reported_for_every_errno(tree):
    """Linux audit reports failed operations on watched objects whatever the errno; the
    kernel sends only those that may concern a watched object (the ENOENT opens of every
    program elsewhere never reach user space)."""
    w, o = tree
    for d in (w, o):
        os.mkdir(f"{d}/d")
        open(f"{d}/d/x", "w").close()
    be = backend_for(watch_rule(w, key="k"), exclude_self=True)
    try:
        before = be.submitted()
        py(FAILING % {"w": w}, w)
        got = [(e.op, e.path, e.path2, e.result, e.keys) for e in drain(be)]
        assert got == [
            ("mkdir", f"{w}/d", None, -errno.EEXIST, ["k"]),
            ("unlink", f"{w}/nothere", None, -errno.ENOENT, ["k"]),
            ("rmdir", f"{w}/d", None, -errno.ENOTEMPTY, ["k"]),
            ("rename", f"{w}/d/x", "/dev/shm/fswa-x", -errno.EXDEV, ["k"]),
            ("link", f"{w}/d/x", "/dev/shm/fswa-x", -errno.EXDEV, ["k"]),
            ("open", f"{w}/nothere", None, -errno.ENOENT, ["k"]),
            ("mkdir", f"{w}/d", None, -errno.EEXIST, ["k"]),
            ("unlink", f"{w}/nothere", None, -errno.ENOENT, ["k"]),
            ("unlink", f"{w}/nothere", None, -errno.ENOENT, ["k"])]
        # the kernel sent those and nothing else (not the sibling's failure)
        assert be.submitted() - before == len(got)
        # the same failures elsewhere: nothing reaches user space, but a relative name
        # climbing out of its directory may lead into the watched tree (it does here)
        before = be.submitted()
        py(FAILING % {"w": o} + "fails(os.unlink, '../w/nothere')\n", o)
        assert [(e.op, e.path, e.result) for e in drain(be)] == [
            ("unlink", f"{w}/nothere", -errno.ENOENT)]
        assert be.submitted() - before == 1
    finally:
        be.close()


def test_rename_and_removal_records_carry_the_objects_own_inode(tree):
    w, _ = tree
    os.makedirs(f"{w}/a/x")
    open(f"{w}/f", "w").close()
    os.link(f"{w}/f", f"{w}/f2")
    ino = {n: os.stat(f"{w}/{n}").st_ino for n in ("a/x", "f")}
    be = backend_for(watch_rule(w))
    try:
        os.rename(f"{w}/f", f"{w}/g")          # within a directory
        os.rename(f"{w}/g", f"{w}/a/g")        # to another directory
        os.rename(f"{w}/a/x", f"{w}/x")        # a directory, out of its parent
        open(f"{w}/t", "w").close()
        os.rename(f"{w}/a/g", f"{w}/t")        # over an existing file
        os.unlink(f"{w}/f2")                   # one of two links
        os.rmdir(f"{w}/x")
        got = [(e.op, e.path, e.ino) for e in drain(be) if e.op != "create"]
        assert got == [("rename", f"{w}/f", ino["f"]), ("rename", f"{w}/g", ino["f"]),
                       ("rename", f"{w}/a/x", ino["a/x"]), ("rename", f"{w}/a/g", ino["f"]),
                       ("unlink", f"{w}/f2", ino["f"]), ("rmdir", f"{w}/x", ino["a/x"])]
    finally:
        be.close()


def test_chmod_through_proc_fd_and_write_through_a_file_handle(tree):
    """tar sets final modes through /proc/self/fd/N; open_by_handle_at reaches a file
    with no name at all: the inode decides, and the path is the one the process used
    (the handle's: the file's own)."""
    from test_watch_evasion import chmod_through_proc_fd, write_by_handle
    w, _ = tree
    target = f"{w}/f"
    open(target, "w").close()
    ino = os.stat(target).st_ino
    be = backend_for(watch_rule(w, perms="wa", key="k"))
    try:
        chmod_through_proc_fd(target)
        write_by_handle(target)
        got = [(e.op, e.path, e.syscall, e.access, e.ino, e.keys) for e in drain(be)]
        assert len(got) == 2 and got[0][1].startswith("/proc/self/fd/"), got
        assert got == [("chmod", got[0][1], "chmod", None, ino, ["k"]),
                       ("open", target, "open_by_handle_at", "w", ino, ["k"])]
    finally:
        be.close()


# what both io_uring helpers below start with: submit one request, wait for its result
IO_URING_RUN_C = r"""
#include <liburing.h>
#include <fcntl.h>
#include <unistd.h>
static struct io_uring ring;
static int run(void) {
    struct io_uring_cqe *cqe;
    io_uring_submit(&ring);
    if (io_uring_wait_cqe(&ring, &cqe)) return -1;
    int res = cqe->res;
    io_uring_cqe_seen(&ring, cqe);
    return res;
}
"""


def run_uring(tmp_path, w: str, source: str) -> tuple[int, int, list]:
    """Run an io_uring helper in w, which holds a file f, under a watch of w: the
    helper's pid, f's inode before it ran, and the events."""
    prog = uring_program(tmp_path, source)
    open(f"{w}/f", "w").close()
    ino = os.stat(f"{w}/f").st_ino
    be = backend_for(watch_rule(w, perms="wa", key="u"), exclude_self=True)
    try:
        proc = subprocess.Popen([prog], cwd=w)
        assert proc.wait() == 0
        return proc.pid, ino, drain(be)
    finally:
        be.close()


def uring_program(tmp_path, source: str) -> str:
    """One of the io_uring helpers, built with liburing (scripts/setup installs it)."""
    assert os.path.exists("/usr/include/liburing.h"), "liburing-dev: run scripts/setup"
    (tmp_path / "u.c").write_text(source)
    prog = str(tmp_path / "u")
    subprocess.run(["gcc", "-O2", "-o", prog, str(tmp_path / "u.c"), "-luring"], check=True)
    return prog


IO_URING_NAMES_C = IO_URING_RUN_C + r"""
/* in the cwd, through io_uring: open the existing file "f" for write, create "c",
 * rename "f" to "g", link "g" as "h", symlink "s" -> "g", mkdir "d", rmdir "d" */
int main(void) {
    if (io_uring_queue_init(4, &ring, 0)) return 2;
    io_uring_prep_openat(io_uring_get_sqe(&ring), AT_FDCWD, "f", O_WRONLY, 0);
    int fd = run();
    if (fd < 0 || write(fd, "x", 1) != 1) return 3;
    close(fd);
    io_uring_prep_openat(io_uring_get_sqe(&ring), AT_FDCWD, "c", O_WRONLY | O_CREAT, 0644);
    if ((fd = run()) < 0) return 4;
    close(fd);
    io_uring_prep_renameat(io_uring_get_sqe(&ring), AT_FDCWD, "f", AT_FDCWD, "g", 0);
    if (run()) return 5;
    io_uring_prep_linkat(io_uring_get_sqe(&ring), AT_FDCWD, "g", AT_FDCWD, "h", 0);
    if (run()) return 6;
    io_uring_prep_symlinkat(io_uring_get_sqe(&ring), "g", AT_FDCWD, "s");
    if (run()) return 7;
    io_uring_prep_mkdirat(io_uring_get_sqe(&ring), AT_FDCWD, "d", 0755);
    if (run()) return 8;
    io_uring_prep_unlinkat(io_uring_get_sqe(&ring), AT_FDCWD, "d", AT_REMOVEDIR);
    if (run()) return 9;
    return 0;
}
"""


def test_io_uring_opens_and_names_are_those_of_the_request(tree, tmp_path):
    """An open of an existing file for write changes nothing: it is seen at its
    completion.  Rename, link, symlink, mkdir and rmdir carry the names the request was
    given (both of them for rename and link), not the names the objects have later."""
    w, _ = tree
    pid, ino, events = run_uring(tmp_path, w, IO_URING_NAMES_C)
    got = [(e.op, e.path, e.path2, e.access, e.pid, e.keys) for e in events]
    assert got == [
        ("open", f"{w}/f", None, "w", pid, ["u"]),
        ("create", f"{w}/c", None, None, pid, ["u"]),
        ("rename", f"{w}/f", f"{w}/g", None, pid, ["u"]),
        ("link", f"{w}/g", f"{w}/h", None, pid, ["u"]),
        ("symlink", f"{w}/s", None, None, pid, ["u"]),
        ("mkdir", f"{w}/d", None, None, pid, ["u"]),
        ("rmdir", f"{w}/d", None, None, pid, ["u"])]
    assert os.stat(f"{w}/g").st_ino == ino


@pytest.mark.parametrize("depth", [20, 40])
def test_changes_deep_in_a_tree_made_before_the_start_are_reported(tree, depth):
    """A tree made before the trace starts has no directory judged below the watch: the
    kernel's walk (16 levels) ends short and is continued in programs of its own
    (deep_walk), which judge the whole chain.  Create, write, chmod and unlink at the
    bottom are reported with the watch's key, the path and the object's own inode; a
    deep tree that is not watched sends nothing to user space."""
    w, o = tree
    sub = "/d" * depth
    os.makedirs(w + sub)
    os.makedirs(o + sub)
    bottom, other = w + sub, o + sub
    open(f"{bottom}/old", "w").close()
    be = backend_for(watch_rule(w, perms="wa", key="deep"))
    try:
        before = be.submitted()
        for d in (other, f"{o}/d"):                 # unwatched: nothing sent
            open(f"{d}/f", "w").close()
            os.chmod(f"{d}/f", 0o600)
            open(f"{d}/f", "a").close()
            os.unlink(f"{d}/f")
        assert be.submitted() == before, "an unwatched deep tree reached user space"
        ino_old = os.stat(f"{bottom}/old").st_ino
        with open(f"{bottom}/old", "a") as fh:      # no ctime change: judged at the open
            fh.write("x")
        open(f"{bottom}/f", "w").close()
        ino = os.stat(f"{bottom}/f").st_ino
        os.chmod(f"{bottom}/f", 0o600)
        os.unlink(f"{bottom}/f")
        with pytest.raises(FileExistsError):        # judged by its name
            os.mkdir(bottom)
        got = [(e.op, e.path, e.ino, e.keys) for e in drain(be)]
        assert got == [("open", f"{bottom}/old", ino_old, ["deep"]),
                       ("create", f"{bottom}/f", ino, ["deep"]),
                       ("chmod", f"{bottom}/f", ino, ["deep"]),
                       ("unlink", f"{bottom}/f", ino, ["deep"]),
                       ("mkdir", bottom, None, ["deep"])], got
        assert "too_deep" not in be.lost(), be.lost()
    finally:
        be.close()


def test_records_carry_the_directories_holding_their_names(tree):
    """As auditd's PARENT items: the directory of a new entry, of a removed one, both
    of a rename, the new name's of a link; in the JSON form and the auditd text."""
    from fswatchaudit.sinks.auditd import format_event
    w, _ = tree
    os.makedirs(f"{w}/a")
    os.makedirs(f"{w}/b")
    ino = {n: os.stat(f"{w}/{n}").st_ino for n in ("a", "b", "deep/er")}
    be = backend_for(watch_rule(w))
    try:
        open(f"{w}/a/f", "w").close()
        os.mkdir(f"{w}/a/d")
        os.rename(f"{w}/a/f", f"{w}/b/g")
        os.rename(f"{w}/b/g", f"{w}/b/h")
        os.link(f"{w}/b/h", f"{w}/deep/er/l")
        os.unlink(f"{w}/b/h")
        os.rmdir(f"{w}/a/d")
        os.chmod(f"{w}/deep/er/l", 0o600)
        got = drain(be)
        assert [(e.op, e.parent_ino, e.parent2_ino) for e in got] == [
            ("create", ino["a"], None), ("mkdir", ino["a"], None),
            ("rename", ino["a"], ino["b"]), ("rename", ino["b"], ino["b"]),
            ("link", None, ino["deep/er"]), ("unlink", ino["b"], None),
            ("rmdir", ino["a"], None), ("chmod", None, None)], got
        assert got[2].to_dict()["parent2_ino"] == ino["b"]
        text = format_event(got[2]).decode()
        assert f"name=\"{w}/a\" inode={ino['a']}" in text and "nametype=PARENT" in text
    finally:
        be.close()


IO_URING_FIXED_C = IO_URING_RUN_C + r"""
/* in the cwd, through io_uring into fixed file slots (no fd): open the existing file
 * "f" for write into a slot the kernel picks and write through it, create "c" in
 * slot 1 */
int main(void) {
    if (io_uring_queue_init(4, &ring, 0)) return 2;
    if (io_uring_register_files_sparse(&ring, 4)) return 3;
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    io_uring_prep_openat(sqe, AT_FDCWD, "f", O_WRONLY, 0);
    sqe->file_index = IORING_FILE_INDEX_ALLOC;  /* liburing 2.3 has no helper for it */
    int slot = run();
    if (slot < 0) return 4;
    sqe = io_uring_get_sqe(&ring);
    io_uring_prep_write(sqe, slot, "x", 1, 0);
    sqe->flags |= IOSQE_FIXED_FILE;
    if (run() != 1) return 5;
    io_uring_prep_openat_direct(io_uring_get_sqe(&ring), AT_FDCWD, "c", O_WRONLY | O_CREAT,
                                0644, 1);
    if (run() < 0) return 6;
    return 0;
}
"""


def test_io_uring_opens_into_fixed_file_slots_are_reported(tree, tmp_path):
    """An open into a fixed file slot installs no fd: the file is found in the ring's
    table of slots at the open's completion.  A creation into a slot is seen in the
    worker, as any io_uring creation."""
    w, _ = tree
    pid, ino, events = run_uring(tmp_path, w, IO_URING_FIXED_C)
    got = [(e.op, e.path, e.access, e.ino, e.pid, e.keys) for e in events
           if e.op != "attr"]               # the write's time change, from the worker
    assert got == [("open", f"{w}/f", "w", ino, pid, ["u"]),
                   ("create", f"{w}/c", None, os.stat(f"{w}/c").st_ino, pid, ["u"])], got


STUB_C = "#include <unistd.h>\nint main(int c, char **v) { execv(v[1], v + 1); return 127; }\n"
WRITER_C = r"""
#include <fcntl.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int fd = open(argv[1], O_CREAT | O_WRONLY | O_TRUNC, 0644);
    return fd < 0 || write(fd, "x\n", 2) != 2;
}
"""


def test_each_program_is_named_after_an_exec_whatever_memory_it_reuses(tree, tmp_path):
    """A shell records a change, then execs a program that execs another which changes
    a file: the last record names the last program.  (The kernel may give the new
    program's file the memory of the shell's, so a record cannot say "the same program
    as before" by the file's address.)"""
    w, _ = tree
    for name, src in (("stub", STUB_C), ("writer", WRITER_C)):
        (tmp_path / f"{name}.c").write_text(src)
        subprocess.run(["gcc", "-O2", "-static", "-o", str(tmp_path / name),
                        str(tmp_path / f"{name}.c")], check=True)
    stub, writer = str(tmp_path / "stub"), str(tmp_path / "writer")
    busybox = os.path.realpath(shutil.which("busybox"))
    be = backend_for(watch_rule(w))
    try:
        for i in range(6):
            subprocess.run(["taskset", "-c", "0", busybox, "sh", "-c",
                            f': > {w}/by-shell{i}; exec "$0" "$1" {w}/by-writer{i}',
                            stub, writer], check=True)
        got = {e.path: e.exe for e in drain(be) if e.op == "create"}
        for i in range(6):
            assert got[f"{w}/by-shell{i}"] == busybox
            assert got[f"{w}/by-writer{i}"] == writer, got
    finally:
        be.close()


def test_records_too_big_for_the_kernel_are_marked_cut_and_never_stop_the_audit(tree):
    """Two base directories of 33 levels of 255-byte names fill a record's string area
    (a rename through deep directory fds), and a program 40 levels deep has an exe
    path longer than one walk: each record is still reported, with the fields the
    kernel could not give whole named in `cut` (a partial path starts with "...", so
    it cannot pass for another absolute path), and the audit goes on."""
    w, o = tree
    fd = os.open(o, os.O_RDONLY)
    for i in range(33):
        name = f"{i:02d}".ljust(255, "x")
        os.mkdir(name, dir_fd=fd)
        nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    deep_bin = o + "/b" * 40
    os.makedirs(deep_bin)
    shutil.copy("/usr/bin/touch", f"{deep_bin}/touch")
    open(f"{w}/protected", "w").close()
    be = backend_for(watch_rule(w))
    try:
        os.rename(f"{w}/protected", f"{w}/x", src_dir_fd=fd, dst_dir_fd=fd)
        subprocess.run([f"{deep_bin}/touch", f"{w}/by-deep-program"], check=True)
        open(f"{w}/after", "w").close()
        got = drain(be)
        ren = [e for e in got if e.op == "rename"]
        assert [e.path for e in ren] == [f"{w}/protected"]    # an absolute name
        assert ren[0].path2 == f"{w}/x" or (ren[0].path2 is None and "path2" in ren[0].cut)
        assert ren[0].cut and ren[0].ino, ren[0]
        made = {e.path: e for e in got if e.op == "create"}
        deep = made[f"{w}/by-deep-program"]
        assert deep.exe == f"{deep_bin}/touch" or (
            deep.exe.startswith(".../") and "exe" in deep.cut), deep
        assert f"{w}/after" in made and not made[f"{w}/after"].cut
    finally:
        os.close(fd)
        be.close()


def test_a_watched_name_made_by_rename_or_link_from_outside_is_reported(tree):
    """`-w FILE` on a file that does not exist yet (`-w /etc/ld.so.preload`): a file
    moved or hard-linked into that name from an unwatched directory is reported with
    its own inode, as Linux audit reports it; so is a rename over an existing watched
    file (the moved file's inode, not the replaced one's)."""
    w, o = tree
    for name in ("moved", "linked", "over"):
        with open(f"{o}/{name}", "w") as fh:
            fh.write(name)
    open(f"{w}/existing", "w").close()
    be = backend_for(f"-w {w}/preload -p wa -k preload", f"-w {w}/hardlink -p wa -k link",
                     f"-w {w}/existing -p wa -k existing")
    try:
        ino = {n: os.stat(f"{o}/{n}").st_ino for n in ("moved", "linked", "over")}
        os.rename(f"{o}/moved", f"{w}/preload")
        os.link(f"{o}/linked", f"{w}/hardlink")
        os.rename(f"{o}/over", f"{w}/existing")
        got = [(e.op, e.path, e.path2, e.ino, e.keys) for e in drain(be)]
        assert got == [
            ("rename", f"{o}/moved", f"{w}/preload", ino["moved"], ["preload"]),
            ("link", f"{o}/linked", f"{w}/hardlink", ino["linked"], ["link"]),
            ("rename", f"{o}/over", f"{w}/existing", ino["over"], ["existing"])], got
    finally:
        be.close()


def test_changes_within_one_unwatched_directory_are_judged_by_their_own_names(tree):
    """A create, link or rename inside one unwatched directory is settled at the
    syscall's end by what that directory grants its entries (no second judgment), so
    each way the same directory can still grant something is tried there: a new name a
    file watch names (mknod, rename, link), a link and a rename of a watched file, a
    rename of a file whose other link is in a watched directory.  Plain changes there
    stay unreported."""
    w, o = tree
    open(f"{o}/watched", "w").close()
    open(f"{o}/linked-in-w", "w").close()
    os.link(f"{o}/linked-in-w", f"{w}/other-name")
    for name in ("a", "b", "plain"):
        open(f"{o}/{name}", "w").close()
    be = backend_for(f"-w {o}/named -p wa -k named", f"-w {o}/named2 -p wa -k named2",
                     f"-w {o}/named3 -p wa -k named3", f"-w {o}/watched -p wa -k file",
                     f"-w {w} -p wa -k dir")
    try:
        ino = {n: os.stat(f"{o}/{n}").st_ino for n in ("a", "b", "watched", "linked-in-w")}
        os.rename(f"{o}/plain", f"{o}/plain2")          # nothing watched: no record
        os.mknod(f"{o}/new", 0o600 | stat.S_IFREG)      # nor here
        os.rename(f"{o}/a", f"{o}/named")
        os.link(f"{o}/b", f"{o}/named2")
        os.mknod(f"{o}/named3", 0o600 | stat.S_IFREG)
        os.link(f"{o}/watched", f"{o}/watched-link")
        os.rename(f"{o}/watched-link", f"{o}/watched-moved")
        os.rename(f"{o}/linked-in-w", f"{o}/moved-in-o")
        got = [(e.op, e.path, e.path2, e.ino, e.keys) for e in drain(be)
               if e.path and e.path.startswith(o)]
        named3 = os.stat(f"{o}/named3").st_ino
        assert got == [
            ("rename", f"{o}/a", f"{o}/named", ino["a"], ["named"]),
            ("link", f"{o}/b", f"{o}/named2", ino["b"], ["named2"]),
            ("mknod", f"{o}/named3", None, named3, ["named3"]),
            ("link", f"{o}/watched", f"{o}/watched-link", ino["watched"], ["file"]),
            ("rename", f"{o}/watched-link", f"{o}/watched-moved", ino["watched"], ["file"]),
            ("rename", f"{o}/linked-in-w", f"{o}/moved-in-o", ino["linked-in-w"], ["dir"]),
        ], got
    finally:
        be.close()


def test_a_stop_reads_everything_the_kernel_already_holds(tree):
    """The consumer stopped (SIGSTOP) while 20,000 changes queue in the ring, then told
    to stop as soon as it runs again: each read takes a bounded batch, and the stop
    reads on until the ring is empty, so every change is logged."""
    w, _ = tree
    trace = Trace("--backend", "ebpf", "--ring-buffer", "64M", w)
    os.kill(trace.proc.pid, signal.SIGSTOP)
    try:
        for i in range(20000):
            os.close(os.open(f"{w}/f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
    finally:
        os.kill(trace.proc.pid, signal.SIGCONT)
    events, stderr, code = trace.stop()
    assert code == 0, stderr
    made = {e["path"] for e in events if e["op"] == "create"}
    assert len(made) == 20000, (len(made), stderr[-2000:])


def test_an_unnamed_file_linked_into_a_watched_name_is_reported(tree):
    """The other way to give an existing inode a watched name: an O_TMPFILE file made
    outside and linked in through /proc/self/fd (linkat with AT_SYMLINK_FOLLOW)."""
    w, o = tree
    be = backend_for(f"-w {w}/preload -p wa -k preload")
    try:
        fd = os.open(o, os.O_TMPFILE | os.O_WRONLY, 0o644)
        try:
            ino = os.fstat(fd).st_ino
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            at_fdcwd, at_symlink_follow = -100, 0x400
            assert libc.linkat(at_fdcwd, f"/proc/self/fd/{fd}".encode(), at_fdcwd,
                               f"{w}/preload".encode(), at_symlink_follow) == 0, \
                ctypes.get_errno()
        finally:
            os.close(fd)
        got = [(e.op, e.path2, e.ino, e.keys) for e in drain(be)]
        assert got == [("link", f"{w}/preload", ino, ["preload"])], got
    finally:
        be.close()


def test_a_base_directory_sent_once_stays_right_when_directories_move(tree):
    """A thread's records after its first one say "the same base directory as before"
    instead of its path, while that is true: after its cwd's parent is renamed, after
    chdir, through a dirfd, the paths are the directories' paths at the time."""
    from fswatchaudit.backends.ebpf.abi import BASE_AS_BEFORE
    w, _ = tree
    be = backend_for(watch_rule(w))
    reused = []
    real_base = be.decoder._base

    def base(tid, parts, n, pos):
        reused.append(n == BASE_AS_BEFORE)
        return real_base(tid, parts, n, pos)
    be.decoder._base = base
    try:
        py("import os\nos.chdir('deep/er')\n"
           "open('a', 'w').close()\nos.chmod('a', 0o600)\nos.chmod('a', 0o640)\n"
           f"os.rename('{w}/deep', '{w}/moved')\nos.chmod('a', 0o600)\n"
           f"os.chdir('{w}')\nos.chmod('moved/er/a', 0o640)\n"
           f"os.chdir('{w}/moved/er')\nos.chmod('a', 0o600)\n"
           f"fd = os.open('{w}/moved', os.O_RDONLY | os.O_DIRECTORY)\n"
           "os.chmod('er/a', 0o640, dir_fd=fd)\nos.chmod('er/a', 0o600, dir_fd=fd)\n", w)
        a = f"{w}/moved/er/a"
        assert ops(drain(be)) == [
            ("create", f"{w}/deep/er/a", None), ("chmod", f"{w}/deep/er/a", None),
            ("chmod", f"{w}/deep/er/a", None),
            ("rename", f"{w}/deep", f"{w}/moved"),
            ("chmod", a, None), ("chmod", a, None), ("chmod", a, None),
            ("open", f"{w}/moved", None), ("chmod", a, None), ("chmod", a, None)]
        assert any(reused), "no record reused its thread's base directory"
    finally:
        be.close()


def test_a_base_directory_reached_through_mounts_is_named_by_the_mount_it_is_reached_by(tree):
    """The same directory reached through one bind mount, then (after that is unmounted)
    through another at another place: each record names the path it was reached by."""
    w, _ = tree
    os.makedirs(f"{w}/a")
    open(f"{w}/a/x", "w").close()
    os.mkdir(f"{w}/b")
    os.mkdir(f"{w}/c")
    be = backend_for(watch_rule(w))
    try:
        py("import os, subprocess\n"
           f"subprocess.run(['mount', '--bind', '{w}/a', '{w}/b'], check=True)\n"
           f"os.chdir('{w}/b')\nos.chmod('x', 0o600)\nos.chmod('x', 0o640)\n"
           f"os.chdir('{w}')\nsubprocess.run(['umount', '{w}/b'], check=True)\n"
           f"subprocess.run(['mount', '--bind', '{w}/a', '{w}/c'], check=True)\n"
           f"os.chdir('{w}/c')\nos.chmod('x', 0o600)\n"
           f"os.chdir('{w}')\nsubprocess.run(['umount', '{w}/c'], check=True)\n", w)
        got = [(e.op, e.path) for e in drain(be) if e.op == "chmod"]
        assert got == [("chmod", f"{w}/b/x"), ("chmod", f"{w}/b/x"), ("chmod", f"{w}/c/x")]
    finally:
        for m in ("b", "c"):
            subprocess.run(["umount", f"{w}/{m}"], capture_output=True)
        be.close()


def test_watches_above_a_mount_follow_rule_changes_and_remounts(tree):
    """Opens on a filesystem mounted below a directory are judged by the watches above
    the mount (kept per mount): a watch added or removed there at run time, and the
    filesystem mounted again elsewhere, change the judgment at once."""
    from fswatchaudit.auditor import Auditor
    from fswatchaudit.sinks import ListSink
    w, o = tree
    mnt, elsewhere = f"{o}/mnt", f"{o}/other/point"
    os.mkdir(mnt)
    os.makedirs(elsewhere)
    be = backend_for(watch_rule(w, key="w"))
    seen = ListSink()
    aud = Auditor(be, be.rules, [seen])
    subprocess.run(["mount", "-t", "tmpfs", "none", mnt], check=True)
    try:
        open(f"{mnt}/f", "w").close()
        py(f"open('{mnt}/f', 'a').close()", o)                      # not watched
        aud.apply([parse_line(f"-w {o} -p wa -k o")])
        py(f"open('{mnt}/f', 'a').close()", o)                      # watched now
        aud.apply([parse_line(f"-W {o} -p wa -k o")])
        py(f"open('{mnt}/f', 'a').close()", o)                      # not any more
        aud.apply([parse_line(f"-w {o}/other -p wa -k e")])
        py(f"open('{mnt}/f', 'a').close()", o)                      # not below e yet
        subprocess.run(["mount", "--move", mnt, elsewhere], check=True)
        py(f"open('{elsewhere}/f', 'a').close()", o)                # moved below e
        aud.poll_once(0.5)
        aud.poll_once(0.3)
        got = [(e.op, e.path, e.keys) for e in seen.events if e.op == "open"]
        assert got == [("open", f"{mnt}/f", ["o"]), ("open", f"{elsewhere}/f", ["e"])]
    finally:
        for m in (elsewhere, mnt):
            subprocess.run(["umount", m], capture_output=True)
        be.close()
