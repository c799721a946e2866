"""Syscall rules without a path on the eBPF backend (`-S unlink -F auid>=1000`, the STIG
forms): real processes with chosen login uids and credentials, on ext4 and tmpfs, and
the kernel's own counters to show that what a filter rejects never reaches the ring.

Path-less rules see every process of the host, so the tests use login uids no other
process here has, and look only at events on their own files."""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from tracehelp import Trace, drain

from fswatchaudit.backends import probe
from fswatchaudit.rules import RuleSet, parse_line

EBPF = probe("ebpf")
pytestmark = pytest.mark.skipif(not EBPF.usable, reason=f"eBPF backend: {EBPF.reason}")
PY = os.path.realpath(sys.executable)
NOBODY = 65534
# login uids no session on this host has: a person (>= the rules' bound) and a system
# account's session (below it)
PERSON, SYSTEM = 424242, 424241


def backend_for(*texts):
    from fswatchaudit.backends.ebpf import EbpfBackend
    rs = RuleSet()
    for t in texts:
        rs.add(parse_line(t).rule)
    be = EbpfBackend(rs)
    be.start()
    return be


def child(code, loginuid=None, resuid=None, resgid=None, check=True):
    """Run Python code in a new process with this login uid and these (real,
    effective, saved) user and group ids."""
    pre = ["import os"]
    if loginuid is not None:
        pre.append(f"open('/proc/self/loginuid', 'w').write('{loginuid}')")
    if resgid is not None:
        pre += ["os.setgroups([])", f"os.setresgid(*{tuple(resgid)})"]
    if resuid is not None:
        pre.append(f"os.setresuid(*{tuple(resuid)})")
    proc = subprocess.run([PY, "-I", "-c", "; ".join(pre) + "\n" + code], check=False)
    if check:
        assert proc.returncode == 0
    return proc


@pytest.fixture(params=["/tmp", "/dev/shm"], ids=["ext4", "tmpfs"])
def where(request):
    d = tempfile.mkdtemp(prefix="fswa-pathless-", dir=request.param)
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d)


def mine(events, d):
    return [e for e in events if (e.path or "").startswith(d + "/")]


def test_auid_rule_logs_only_the_persons_deletes_and_the_kernel_sends_nothing_else(where):
    d = where
    for name in ("a", "b", "c", "d"):
        open(os.path.join(d, name), "w").close()
    be = backend_for(f"-a always,exit -F arch=b64 -S unlink,unlinkat,rename,renameat "
                     f"-F auid>={PERSON} -F auid!=unset -k delete")
    try:
        before = be.submitted()
        # a system account's session: removes and renames, none of which may be sent
        child(f"os.unlink('{d}/a'); os.rename('{d}/b', '{d}/b2')", loginuid=SYSTEM)
        assert be.submitted() == before
        assert mine(drain(be), d) == []
        child(f"os.unlink('{d}/c'); os.rename('{d}/d', '{d}/d2')", loginuid=PERSON)
        got = mine(drain(be), d)
        assert [(e.op, e.path, e.path2, e.loginuid, e.keys) for e in got] == [
            ("unlink", f"{d}/c", None, PERSON, ["delete"]),
            ("rename", f"{d}/d", f"{d}/d2", PERSON, ["delete"])]
        assert be.lost()["ringbuf"] == 0
    finally:
        be.close()


def test_a_session_without_login_uid_is_not_a_person(where):
    d = where
    open(f"{d}/x", "w").close()
    be = backend_for("-a always,exit -S unlink -F auid>=1000 -F auid!=unset -k delete")
    try:
        child(f"os.unlink('{d}/x')", loginuid=4294967295)       # unset, as a daemon's
        assert mine(drain(be), d) == []
    finally:
        be.close()


def test_exit_eacces_logs_only_denied_opens(where):
    d = where
    secret = f"{d}/secret"
    with open(secret, "w") as fh:
        fh.write("s")
    os.chmod(secret, 0o600)
    open(f"{d}/public", "w").close()
    os.chmod(f"{d}/public", 0o644)
    be = backend_for(f"-a always,exit -S open,openat,creat -F exit=-EACCES "
                     f"-F auid>={PERSON} -k access")
    try:
        before = be.submitted()
        code = ("for p, m in (('secret', 'r'), ('public', 'r'), ('nothere', 'r'), "
                "('secret', 'r+')):\n"
                f"    try: open('{d}/' + p, m).close()\n"
                "    except OSError: pass\n")
        child(code, loginuid=PERSON, resuid=(NOBODY,) * 3, resgid=(NOBODY,) * 3)
        got = mine(drain(be), d)
        assert [(e.op, e.path, e.result, e.uid, e.access, e.keys) for e in got] == [
            ("open", secret, -13, NOBODY, "r", ["access"]),
            ("open", secret, -13, NOBODY, "rw", ["access"])]
        # nothing else of that process (its start-up opens, the ENOENT) was sent
        assert be.submitted() - before == 2
    finally:
        be.close()


def test_success_0_logs_only_failed_removals(where):
    d = where
    open(f"{d}/here", "w").close()
    be = backend_for(f"-a always,exit -S unlink -F success=0 -F auid={PERSON} -k failed")
    try:
        child(f"os.unlink('{d}/here')\ntry: os.unlink('{d}/gone')\nexcept OSError: pass",
              loginuid=PERSON)
        got = mine(drain(be), d)
        assert [(e.op, e.path, e.result, e.keys) for e in got] == [
            ("unlink", f"{d}/gone", -2, ["failed"])]
    finally:
        be.close()


@pytest.mark.parametrize("field, matching, other", [
    # real uid: nobody in every id, against root with nobody's effective uid
    ("uid=65534", dict(resuid=(NOBODY,) * 3), dict(resuid=(0, NOBODY, 0))),
    ("euid=65534 -F uid=0", dict(resuid=(0, NOBODY, 0)), dict(resuid=(NOBODY,) * 3)),
    ("gid=65534", dict(resgid=(NOBODY,) * 3), dict(resgid=(0, NOBODY, 0))),
    # the saved ids are seen only by the kernel (no event carries them)
    ("suid=0 -F euid=65534", dict(resuid=(0, NOBODY, 0)), dict(resuid=(0, NOBODY, NOBODY))),
    ("fsgid=65534", dict(resgid=(0, NOBODY, 0)), dict(resgid=(NOBODY, 0, NOBODY))),
    ("fsuid=65534", dict(resuid=(0, NOBODY, 0)), dict(resuid=(NOBODY, 0, NOBODY))),
    ("egid=65534", dict(resgid=(0, NOBODY, 0)), dict(resgid=(NOBODY, 0, NOBODY))),
    ("sgid=65534", dict(resgid=(0, 0, NOBODY)), dict(resgid=(NOBODY, 0, 0))),
], ids=["uid", "euid", "gid", "suid", "fsgid", "fsuid", "egid", "sgid"])
def test_credential_filters(where, field, matching, other):
    d = where
    be = backend_for(f"-a always,exit -S chmod -F auid={PERSON} -F {field} -k cred")
    try:
        for name, creds in (("yes", matching), ("no", other)):
            open(f"{d}/{name}", "w").close()
            os.chmod(f"{d}/{name}", 0o666)
            os.chown(f"{d}/{name}", NOBODY, NOBODY)
            child(f"os.chmod('{d}/{name}', 0o644)", loginuid=PERSON, **creds)
        got = mine(drain(be), d)
        assert [(e.op, e.path, e.keys) for e in got] == [("chmod", f"{d}/yes", ["cred"])]
    finally:
        be.close()


@pytest.mark.parametrize("compare, matching, other", [
    ("uid!=euid", dict(resuid=(0, NOBODY, 0)), dict(resuid=(NOBODY,) * 3)),
    # saved ids: compared in the kernel only
    ("suid!=euid", dict(resuid=(0, NOBODY, 0)), dict(resuid=(0, NOBODY, NOBODY))),
    ("fsgid=sgid", dict(resgid=(0, NOBODY, NOBODY)), dict(resgid=(0, NOBODY, 0))),
], ids=["uid-euid", "suid-euid", "fsgid-sgid"])
def test_field_comparisons(where, compare, matching, other):
    d = where
    be = backend_for(f"-a always,exit -S chmod -F auid={PERSON} -C {compare} -k cmp")
    try:
        for name, creds in (("yes", matching), ("no", other)):
            open(f"{d}/{name}", "w").close()
            os.chown(f"{d}/{name}", NOBODY, NOBODY)
            child(f"os.chmod('{d}/{name}', 0o644)", loginuid=PERSON, **creds)
        got = mine(drain(be), d)
        assert [(e.op, e.path, e.keys) for e in got] == [("chmod", f"{d}/yes", ["cmp"])]
    finally:
        be.close()


def test_ppid_and_pid_filters(where):
    d = where
    for name in ("by-child", "by-grandchild"):
        open(f"{d}/{name}", "w").close()
    # the children of this test process, not their children; and not this process
    be = backend_for(f"-a always,exit -S unlink -F auid={PERSON} -F ppid={os.getpid()} "
                     f"-F pid!={os.getpid()} -k mine")
    try:
        before = be.submitted()
        child(f"os.unlink('{d}/by-child')\n"
              "import subprocess, sys\n"
              f"subprocess.run([sys.executable, '-c', \"import os; "
              f"os.unlink('{d}/by-grandchild')\"], check=True)", loginuid=PERSON)
        got = mine(drain(be), d)
        assert [(e.path, e.ppid, e.keys) for e in got] == [
            (f"{d}/by-child", os.getpid(), ["mine"])]
        assert be.submitted() - before == 1         # the kernel compared the ppid
    finally:
        be.close()


def test_exe_filter_is_applied_by_the_consumer(where):
    d = where
    rm = os.path.realpath(shutil.which("rm"))
    for name in ("by-rm", "by-python"):
        open(f"{d}/{name}", "w").close()
    be = backend_for(f"-a always,exit -S unlink -F auid={PERSON} -F exe={rm} -k rm")
    try:
        child(f"os.unlink('{d}/by-python')\n"
              f"import subprocess; subprocess.run(['{rm}', '{d}/by-rm'], check=True)",
              loginuid=PERSON)
        got = mine(drain(be), d)
        assert [(e.op, e.path, e.exe) for e in got] == [("unlink", f"{d}/by-rm", rm)]
    finally:
        be.close()


def test_path_rules_and_path_less_rules_together(where):
    d = where
    os.mkdir(f"{d}/w")
    os.chmod(f"{d}/w", 0o777)
    for name in ("w/a", "w/b", "o"):
        open(f"{d}/{name}", "w").close()
    be = backend_for(f"-w {d}/w -p wa -k watched",
                     f"-a always,exit -S unlink -F auid={PERSON} -k delete")
    try:
        child(f"os.unlink('{d}/w/a')", loginuid=SYSTEM)     # the watch alone
        child(f"os.unlink('{d}/w/b'); os.unlink('{d}/o')", loginuid=PERSON)
        got = mine(drain(be), d)
        assert [(e.path, e.keys) for e in got] == [
            (f"{d}/w/a", ["watched"]), (f"{d}/w/b", ["delete", "watched"]),
            (f"{d}/o", ["delete"])]
    finally:
        be.close()


def test_path_less_rules_added_and_removed_at_run_time(where):
    d = where
    be = backend_for()
    try:
        rule = parse_line(f"-a always,exit -S unlink -F auid={PERSON} -k delete").rule
        be.add_rule(be.rules.add(rule), rule)
        child(f"open('{d}/a', 'w').close(); os.unlink('{d}/a')", loginuid=PERSON)
        assert [(e.path, e.keys) for e in mine(drain(be), d)] == [(f"{d}/a", ["delete"])]
        be.remove_rule(be.rules.remove(rule), rule)
        before = be.submitted()
        child(f"open('{d}/b', 'w').close(); os.unlink('{d}/b')", loginuid=PERSON)
        assert mine(drain(be), d) == []
        assert be.submitted() == before
    finally:
        be.close()


def test_rules_beyond_the_kernel_slots_are_filtered_by_the_consumer(where):
    from fswatchaudit.backends.ebpf.abi import PATHLESS_SLOTS
    d = where
    extra = [f"-a always,exit -S chmod -F auid={PERSON} -F pid={i + 1} -k c{i}"
             for i in range(PATHLESS_SLOTS)]
    open(f"{d}/f", "w").close()
    be = backend_for(*extra, f"-a always,exit -S unlink -F auid={PERSON} -k delete")
    try:
        assert be.slots[max(be.slots)] >= PATHLESS_SLOTS
        child(f"os.unlink('{d}/f')", loginuid=SYSTEM)
        child(f"open('{d}/g', 'w').close(); os.unlink('{d}/g')", loginuid=PERSON)
        assert [(e.path, e.keys) for e in mine(drain(be), d)] == [(f"{d}/g", ["delete"])]
    finally:
        be.close()


def test_a_whole_set_with_one_condition_is_filtered_in_the_kernel(where):
    """More path-less rules than the kernel keeps conditions for, all with the same
    conditions (as the STIG and OSPP sets write `-F auid>=1000 -F auid!=unset` on
    many syscall lists): they share a slot, so the kernel still filters every one,
    and each event gets the keys of its own rules only."""
    from fswatchaudit.backends.ebpf.abi import PATHLESS_SLOTS
    d = where
    names = ["chmod", "fchmod", "fchmodat", "chown", "fchown", "lchown", "fchownat",
             "unlink", "unlinkat", "rename", "renameat", "renameat2", "mkdir", "mkdirat",
             "rmdir", "link", "linkat", "symlink", "symlinkat", "truncate", "ftruncate",
             "setxattr", "lsetxattr", "fsetxattr"]
    assert len(names) > PATHLESS_SLOTS
    be = backend_for(*(f"-a always,exit -S {n} -F auid>={PERSON} -F auid!=unset -k {n}"
                       for n in names))
    try:
        assert len(set(be.slots.values())) == 1
        open(f"{d}/f", "w").close()
        before = be.submitted()
        child(f"os.chmod('{d}/f', 0o600); os.mkdir('{d}/s'); os.rmdir('{d}/s')",
              loginuid=SYSTEM)
        assert be.submitted() == before          # not one record sent
        child(f"os.chmod('{d}/f', 0o644); os.mkdir('{d}/s'); os.unlink('{d}/f')",
              loginuid=PERSON)
        got = mine(drain(be), d)
        assert [(e.op, e.path, e.keys) for e in got] == [
            ("chmod", f"{d}/f", ["chmod"]), ("mkdir", f"{d}/s", ["mkdir"]),
            ("unlink", f"{d}/f", ["unlink"])]
    finally:
        be.close()


def test_trace_with_path_less_rules_and_the_other_backends_refusing(tmp_path):
    rules = tmp_path / "stig.rules"
    rules.write_text(f"-a always,exit -F arch=b64 -S unlink,unlinkat -F auid>={PERSON} "
                     "-F auid!=unset -k delete\n")
    d = tempfile.mkdtemp(prefix="fswa-pathless-", dir="/tmp")
    try:
        open(f"{d}/x", "w").close()
        trace = Trace("--backend", "ebpf", "-r", str(rules))
        child(f"os.unlink('{d}/x')", loginuid=PERSON)
        trace.wait_for(1)
        events, stderr, code = trace.stop()
        assert code == 0, stderr
        assert "watching 0 paths, 1 syscall rules on every object with ebpf" in stderr
        assert [(e["op"], e["path"], e["keys"]) for e in events
                if e["path"].startswith(d)] == [("unlink", f"{d}/x", ["delete"])]
    finally:
        shutil.rmtree(d)
    for backend in ("fanotify", "inotify"):
        out = subprocess.run([sys.executable, "-m", "fswatchaudit", "trace", "--backend",
                              backend, "-r", str(rules), "--duration", "1"],
                             capture_output=True, text=True)
        assert out.returncode == 2, out.stderr
        assert "cannot audit syscalls on every object" in out.stderr
        assert "Traceback" not in out.stderr


def test_path_less_exec_rules_successes_and_failures(where):
    """execve with no path, as the STIG sets write it: a success is told with the
    program's path and the credentials it runs with, a failure with its errno and the
    name it was given; both filtered by the rules' kernel conditions."""
    d = where
    prog = f"{d}/prog"
    shutil.copy("/usr/bin/true", prog)
    os.chmod(prog, 0o755)
    be = backend_for(f"-a always,exit -S execve -F auid={PERSON} -F success=1 -k exec-ok",
                     f"-a always,exit -S execve -F auid={PERSON} -F success=0 -k exec-failed")
    try:
        run = (f"import subprocess; subprocess.run(['{prog}'], check=True)\n"
               "try:\n"
               f"    subprocess.run(['{d}/missing'])\n"
               "except FileNotFoundError:\n"
               "    pass\n")
        child(run, loginuid=SYSTEM)                 # not the rules' login uid
        child(run, loginuid=PERSON)
        got = mine(drain(be), d)
        assert [(e.op, e.syscall, e.path, e.result, e.loginuid, e.keys) for e in got] == [
            ("exec", "execve", prog, 0, PERSON, ["exec-ok"]),
            ("exec", "execve", f"{d}/missing", -2, PERSON, ["exec-failed"])]
        assert got[0].exe == prog
    finally:
        be.close()


def test_path_less_exec_rule_on_set_user_id_programs(tmp_path):
    """`-S execve -C uid!=euid -F euid=0` (the STIG's privilege escalation rule): only
    a set-user-ID root program run by another user is reported."""
    d = tempfile.mkdtemp(prefix="fswa-setuid-", dir="/tmp")
    try:
        os.chmod(d, 0o755)
        setuid, plain = f"{d}/setuid-true", f"{d}/plain-true"
        for p in (setuid, plain):
            shutil.copy("/usr/bin/true", p)
        os.chmod(setuid, 0o4755)
        os.chmod(plain, 0o755)
        be = backend_for("-a always,exit -S execve -C uid!=euid -F euid=0 "
                         f"-F auid={PERSON} -k setuid")
        try:
            run = (f"import subprocess; subprocess.run(['{setuid}'], check=True); "
                   f"subprocess.run(['{plain}'], check=True)")
            child(run, loginuid=PERSON)                           # root: uid == euid
            child(run, loginuid=PERSON, resuid=(NOBODY, NOBODY, NOBODY))
            got = mine(drain(be), d)
            assert [(e.path, e.uid, e.euid, e.keys) for e in got] == [
                (setuid, NOBODY, 0, ["setuid"])]
        finally:
            be.close()
    finally:
        shutil.rmtree(d)


def test_object_owner_comparison_power_abuse_rule(where):
    """`-F dir=... -F uid=0 -C auid!=obj_uid` (Linux audit's power-abuse rule): root,
    logged in as a person, touching files that person does not own.  The kernel reports
    each object's owner and group (ouid, ogid)."""
    d = where
    own, other = f"{d}/own", f"{d}/other"
    for p, owner in ((own, PERSON), (other, NOBODY)):
        open(p, "w").close()
        os.chown(p, owner, owner)
    be = backend_for(f"-a always,exit -F dir={d} -F uid=0 -F auid={PERSON} "
                     "-C auid!=obj_uid -F perm=wa -k power-abuse")
    try:
        child(f"os.chmod('{own}', 0o600); os.chmod('{other}', 0o600)", loginuid=PERSON)
        got = mine(drain(be), d)
        assert [(e.op, e.path, e.ouid, e.ogid, e.keys) for e in got] == [
            ("chmod", other, NOBODY, NOBODY, ["power-abuse"])]
    finally:
        be.close()


def test_failed_exec_of_a_watched_program_is_reported(where):
    """`-w DIR -p x`: an exec refused (no x bit) or of a missing name in DIR is reported
    with its errno, as Linux audit's watch reports it; outside DIR it is not sent."""
    d = where
    os.mkdir(f"{d}/bin")
    open(f"{d}/bin/noexec", "w").close()
    open(f"{d}/outside", "w").close()
    be = backend_for(f"-w {d}/bin -p x -k run")
    try:
        before = be.submitted()
        for name in ("outside", "missing-outside"):
            child(f"import subprocess\ntry:\n    subprocess.run(['{d}/{name}'])\n"
                  "except OSError:\n    pass\n")
        assert be.submitted() == before             # judged by name in the kernel
        for name in ("bin/noexec", "bin/missing"):
            child(f"import subprocess\ntry:\n    subprocess.run(['{d}/{name}'])\n"
                  "except OSError:\n    pass\n")
        got = mine(drain(be), d)
        assert [(e.op, e.syscall, e.path, e.result, e.keys) for e in got] == [
            ("exec", "execve", f"{d}/bin/noexec", -13, ["run"]),
            ("exec", "execve", f"{d}/bin/missing", -2, ["run"])]
    finally:
        be.close()


# login uids around PERSON, and which of them each operator lets through
AROUND = (PERSON - 1, PERSON, PERSON + 1)


@pytest.mark.parametrize("op, selected", [
    ("=", {PERSON}), ("!=", {PERSON - 1, PERSON + 1}), ("<", {PERSON - 1}),
    (">", {PERSON + 1}), ("<=", {PERSON - 1, PERSON}), (">=", {PERSON, PERSON + 1})])
def test_each_operator_in_the_kernel(op, selected):
    """Every comparison operator, on a field the kernel compares: three processes with
    login uids just below, at and above the value; what the rule rejects is never
    sent (the kernel's counter), and only the others are logged."""
    d = tempfile.mkdtemp(prefix="fswa-op-", dir="/tmp")
    try:
        be = backend_for(f"-a always,exit -S unlink -F auid{op}{PERSON} "
                         f"-F auid>={PERSON - 1} -F auid<={PERSON + 1} -k op")
        try:
            before = be.submitted()
            for auid in AROUND:
                open(f"{d}/{auid}", "w").close()
                child(f"os.unlink('{d}/{auid}')", loginuid=auid)
            got = mine(drain(be), d)
            assert [(e.path, e.loginuid, e.keys) for e in got] == [
                (f"{d}/{auid}", auid, ["op"]) for auid in AROUND if auid in selected]
            assert be.submitted() - before == len(selected)
        finally:
            be.close()
    finally:
        shutil.rmtree(d)


def test_comm_and_device_fields_are_applied_by_the_consumer(where):
    """`-F comm=` (the command name) and `-F dev_major=` (the object's device) on the
    events the kernel sends."""
    d = where
    major = os.major(os.stat(d).st_dev)
    for name in ("by-touch", "by-python"):
        open(f"{d}/{name}", "w").close()
    touch = shutil.which("touch")
    be = backend_for(f"-a always,exit -S utimensat -F auid={PERSON} -F comm=touch "
                     f"-F dev_major={major} -k touched",
                     f"-a always,exit -S utimensat -F auid={PERSON} "
                     f"-F dev_major!={major} -k elsewhere")
    try:
        child(f"os.utime('{d}/by-python')\n"
              f"import subprocess; subprocess.run(['{touch}', '{d}/by-touch'], check=True)",
              loginuid=PERSON)
        got = mine(drain(be), d)
        assert [(e.path, e.comm, e.keys) for e in got] == [(f"{d}/by-touch", "touch",
                                                             ["touched"])]
    finally:
        be.close()


def test_arch_b32_and_b64_rules_on_real_32_bit_syscalls(tmp_path):
    """-F arch=b32 selects syscalls made through the 32-bit entry (here `int $0x80`
    from a 64-bit program), -F arch=b64 the machine's own, each filtered in the
    kernel by its own table."""
    from test_ebpf import INT80_C
    assert os.uname().machine == "x86_64", "the helper uses the x86 32-bit syscall entry"
    (tmp_path / "int80.c").write_text(INT80_C)
    helper = tmp_path / "int80"
    subprocess.run(["gcc", "-O2", "-no-pie", "-o", str(helper), str(tmp_path / "int80.c")],
                   check=True)
    d = tempfile.mkdtemp(prefix="fswa-arch-", dir="/tmp")
    try:
        be = backend_for(f"-a always,exit -F arch=b32 -S chmod,mkdir -F auid={PERSON} "
                         "-k b32",
                         f"-a always,exit -F arch=b64 -S chmod,mkdir -F auid={PERSON} "
                         "-k b64")
        try:
            child(f"import subprocess; subprocess.run(['{helper}', '{d}/d32', '{d}/l32'], "
                  f"check=True); os.mkdir('{d}/d64'); os.chmod('{d}/d64', 0o700)",
                  loginuid=PERSON)
            got = mine(drain(be), d)
            assert [(e.op, e.path, e.keys) for e in got] == [
                ("mkdir", f"{d}/d32", ["b32"]), ("chmod", f"{d}/d32", ["b32"]),
                ("mkdir", f"{d}/d64", ["b64"]), ("chmod", f"{d}/d64", ["b64"])]
        finally:
            be.close()
    finally:
        shutil.rmtree(d)


def test_path_less_exec_rule_sees_an_exec_through_a_file_descriptor(where):
    """fexecve (execveat(fd, "", AT_EMPTY_PATH)) reaches the program another way: the
    rule on execveat reports it with the program's path."""
    d = where
    prog = f"{d}/prog"
    shutil.copy("/usr/bin/true", prog)
    os.chmod(prog, 0o755)
    be = backend_for(f"-a always,exit -S execveat -F auid={PERSON} -k by-fd")
    try:
        child(f"fd = os.open('{prog}', os.O_RDONLY)\n"
              "pid = os.fork()\n"
              "if pid == 0:\n"
              "    os.execve(fd, ['prog'], {})\n"
              "assert os.waitpid(pid, 0)[1] == 0\n", loginuid=PERSON)
        got = mine(drain(be), d)
        assert [(e.op, e.syscall, e.path, e.keys) for e in got] == [
            ("exec", "execveat", prog, ["by-fd"])]
    finally:
        be.close()
