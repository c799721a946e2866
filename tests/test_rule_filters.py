"""auditctl's field filters on real processes (eBPF backend), and what each backend
refuses instead of widening."""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
from tracehelp import Trace

from fswatchaudit import backends, rules
from fswatchaudit.capabilities import refusal
from fswatchaudit.events import Event
from fswatchaudit.rules import RuleError, RuleSet

EBPF = backends.probe("ebpf")
needs_ebpf = pytest.mark.skipif(not EBPF.usable, reason=f"eBPF backend: {EBPF.reason}")


def rule(text):
    return rules.parse_line(text).rule


def ev(**kw):
    base = dict(op="unlink", path="/srv/f", backend="ebpf", result=0, loginuid=1000,
                uid=0, exe="/usr/bin/rm", comm="rm")
    base.update(kw)
    return Event(**base)


def test_comparisons_select_events():
    login = rule("-a always,exit -F dir=/srv -F auid>=1000 -F auid!=unset -S unlink")
    assert login.matches(ev()) and not login.matches(ev(loginuid=999))
    assert not login.matches(ev(loginuid=4294967295))          # never logged in
    failed = rule("-a always,exit -F dir=/srv -F success=0")
    assert failed.matches(ev(result=-13)) and not failed.matches(ev())
    denied = rule("-a always,exit -F dir=/srv -F exit=-EACCES")
    assert denied.matches(ev(result=-13)) and not denied.matches(ev(result=-1))
    assert denied.text().endswith("-F exit=-EACCES")
    touch = rule("-a always,exit -F dir=/srv -F exe=/usr/bin/touch")
    assert touch.matches(ev(exe="/usr/bin/touch")) and not touch.matches(ev())
    assert rule("-a always,exit -F dir=/srv -F comm!=rm").matches(ev(comm="mv"))
    assert rule("-a always,exit -F dir=/srv -F uid=root").conds[-1].value == 0
    with pytest.raises(RuleError, match="no user named 'nosuchuser'"):
        rule("-a always,exit -F dir=/srv -F uid=nosuchuser")


def test_arch_b32_and_b64_are_two_rules():
    rs = RuleSet()
    rs.apply([rules.parse_line(f"-a always,exit -F arch={a} -S unlink -F dir=/srv -k d")
              for a in ("b32", "b64")])
    assert len(rs) == 2
    assert rs.texts()[0].startswith("-a always,exit -F arch=b32 -F dir=/srv")
    b32 = rule("-a always,exit -F arch=b32 -F dir=/srv")
    assert not b32.matches(ev())                   # a native event is not a b32 one


def test_syscall_names_and_messages():
    assert rule("-a always,exit -S open_by_handle_at -F dir=/srv").syscalls == \
        {"open_by_handle_at"}
    assert rule("-a always,exit -S file_setattr -F dir=/srv").ops == {"attr"}
    with pytest.raises(RuleError, match="'adjtimex' is not audited by this product"):
        rule("-a always,exit -S adjtimex -F dir=/srv")
    with pytest.raises(RuleError, match=r"unknown syscall or alias 'unlnk' \(did you mean "
                                        r"'unlink'\?\)"):
        rule("-a always,exit -S unlnk -F dir=/srv")
    with pytest.raises(RuleError) as info:
        rule("-a always,exit -S frobnicate -F dir=/srv")
    assert "did you mean" not in str(info.value)        # nothing close: no guess


def test_a_path_less_rule_is_a_rule_on_every_object():
    r = rule("-a always,exit -F arch=b64 -S unlink,rename -F auid>=1000 -F auid!=-1 -k del")
    assert r.kind == "syscall" and r.target is None
    assert r.matches(ev(path="/anywhere/x")) and not r.matches(ev(op="chmod"))


@pytest.mark.parametrize("backend, text, reason", [
    ("inotify", "-a always,exit -F dir=/srv -F uid=0", "does not report uid"),
    ("fanotify", "-a always,exit -F dir=/srv -F success=0", "does not report result"),
    ("ebpf", "-a always,exit -F dir=/srv -F suid=0", "does not report suid"),
    ("fanotify", "-a always,exit -S unlink -F auid>=1000", "syscalls on every object"),
    ("inotify", "-a always,exit -F arch=b32 -F dir=/srv", "does not report arch"),
])
def test_backends_refuse_what_they_cannot_honour(backend, text, reason):
    assert reason in refusal(backend, rule(text))
    assert refusal(backend, rule("-w /srv -p wa")) is None
    assert refusal(backend, rule("-a always,exit -F arch=b64 -F dir=/srv")) is None


def test_path_less_rules_on_ebpf_compare_kernel_only_credentials():
    from fswatchaudit.backends.ebpf.abi import KERNEL_FIELDS
    from fswatchaudit.capabilities import CAPABILITIES
    assert CAPABILITIES["ebpf"].pathless_fields <= set(KERNEL_FIELDS)
    pathless = rule("-a always,exit -S chmod -F suid=0 -F fsgid=0 -F auid>=1000 -k m")
    assert refusal("ebpf", pathless) is None
    # on a path rule the kernel does not compare them, and no event carries them
    assert "does not report suid" in refusal("ebpf", rule("-a always,exit -F dir=/srv "
                                                          "-F suid=0"))
    # every file syscall, execve included (told at the exec, tests/test_pathless.py)
    assert refusal("ebpf", rule("-a always,exit -S all -F auid>=1000")) is None


def test_field_comparisons_parse_as_data_and_select_events():
    r = rule("-a always,exit -F arch=b64 -S chmod -C uid!=euid -F euid=0 -k setuid")
    assert [(c.left, c.op, c.right) for c in r.compares] == [("uid", "!=", "euid")]
    assert r.text() == "-a always,exit -F arch=b64 -F euid=0 -C uid!=euid -S chmod -k setuid"
    assert rules.parse_line(r.text()).rule == r
    assert r.matches(ev(op="chmod", uid=1000, euid=0))
    assert not r.matches(ev(op="chmod", uid=0, euid=0))
    assert rule("-a always,exit -F dir=/srv -C auid=uid").matches(ev(uid=1000))
    assert rule("-a always,exit -F dir=/srv -C auid!=uid") != rule("-a always,exit "
                                                                   "-F dir=/srv -C auid=uid")
    for text, message in [
            ("-C uid!=gid", "a user id compares only with a user id"),
            ("-C uid<euid", "does not take the operator '<'"),
            ("-C uid!=eiud", "cannot compare 'eiud' (did you mean 'euid'?)"),
            ("-C uid=uid", "compared with itself"),
            ("-C uid", "expected NAME=NAME")]:
        with pytest.raises(RuleError, match=re.escape(message)):
            rule(f"-a always,exit -F dir=/srv {text}")
    with pytest.raises(RuleError, match="cannot be combined with -F, -C or -S"):
        rule("-w /srv -C uid!=euid")


@pytest.mark.parametrize("backend, text, reason", [
    ("fanotify", "-a always,exit -F dir=/home -F uid=0 -C auid!=obj_uid",
     "does not report ouid"),
    ("ebpf", "-a always,exit -F dir=/srv -C suid!=uid", "does not report suid"),
    ("inotify", "-a always,exit -F dir=/srv -C uid!=euid", "does not report uid"),
    ("fanotify", "-a always,exit -F dir=/srv -C egid!=gid", "does not report egid"),
])
def test_comparisons_a_backend_cannot_honour_are_refused(backend, text, reason):
    assert reason in refusal(backend, rule(text))


def test_comparisons_backends_honour():
    assert refusal("fanotify", rule("-a always,exit -F dir=/srv -C uid!=euid")) is None
    assert refusal("ebpf", rule("-a always,exit -S chmod -C suid!=uid -C fsgid=egid")) \
        is None
    # the object's owner: the eBPF backend reports it (ouid, ogid)
    assert refusal("ebpf", rule("-a always,exit -F dir=/home -F uid=0 -C auid!=obj_uid")) \
        is None
    r = rule("-a always,exit -F dir=/srv -C auid!=obj_uid")
    assert r.matches(ev(loginuid=1000, ouid=1001))
    assert not r.matches(ev(loginuid=1000, ouid=1000))
    assert not r.matches(ev(loginuid=1000))             # owner unknown: not selected


@pytest.fixture
def tree():
    base = tempfile.mkdtemp(prefix="fswa-filter-", dir="/tmp")
    os.chmod(base, 0o755)
    w = os.path.join(base, "w")
    os.mkdir(w)
    os.chmod(w, 0o777)
    yield base, w
    shutil.rmtree(base)


def as_login(loginuid: int, script: str, user: int | None = None) -> None:
    """Run a shell script in a process whose login uid is set (as pam_loginuid does)."""
    prefix = f"echo {loginuid} > /proc/self/loginuid && "
    if user is not None:
        script = f"exec setpriv --reuid={user} --regid={user} --clear-groups -- sh -c '{script}'"
    subprocess.run(["sh", "-c", prefix + script], check=True)


def traced(base, w, rule_text, work):
    path = os.path.join(base, "r.rules")
    with open(path, "w") as fh:
        fh.write(rule_text.format(w=w) + "\n")
    trace = Trace("--backend", "ebpf", "-r", path)
    work()
    marker = os.path.join(w, "zz-marker")
    open(marker, "w").close()          # a last event every rule file below reports
    trace.wait_for(1)
    events, stderr, code = trace.stop()
    assert code == 0, stderr
    return [e for e in events if e.get("path") != marker]


@needs_ebpf
def test_auid_filter_logs_only_the_logged_in_users_deletes(tree):
    base, w = tree
    for name in ("a", "b"):
        open(os.path.join(w, name), "w").close()

    def work():
        as_login(500, f"rm {w}/a")              # a system account's session
        as_login(1000, f"rm {w}/b")             # a person's session
    got = traced(base, w, "-a always,exit -F dir={w} -F auid>=1000 -F auid!=unset -k del\n"
                          "-w {w}/zz-marker", work)
    deletes = [(e["op"], e["path"], e["loginuid"], e["keys"]) for e in got]
    assert deletes == [("unlink", f"{w}/b", 1000, ["del"])]


@needs_ebpf
def test_success_0_logs_only_failed_attempts(tree):
    base, w = tree
    os.chmod(w, 0o755)

    def work():
        open(os.path.join(w, "mine"), "w").close()                     # succeeds
        subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "--", "touch", f"{w}/theirs"], check=False)
    got = traced(base, w, "-a always,exit -F dir={w} -F success=0 -k failed\n"
                          "-w {w}/zz-marker", work)
    # touch: the create is denied (EACCES), then setting the times of what is not
    # there fails too (ENOENT); every errno is reported, as Linux audit does
    assert [(e["op"], e["path"], e["result"], e["uid"]) for e in got] == \
        [("create", f"{w}/theirs", -13, 65534), ("utime", f"{w}/theirs", -2, 65534)]


@needs_ebpf
def test_exe_filter(tree):
    base, w = tree
    touch = shutil.which("touch")

    def work():
        subprocess.run([touch, f"{w}/by-touch"], check=True)
        subprocess.run(["sh", "-c", f": > {w}/by-sh"], check=True)
    got = traced(base, w, f"-a always,exit -F dir={{w}} -F exe={os.path.realpath(touch)}"
                          " -k t\n-w {w}/zz-marker", work)
    assert {(e["op"], e["path"]) for e in got if e["op"] == "create"} == \
        {("create", f"{w}/by-touch")}
    assert all(e["exe"] == os.path.realpath(touch) for e in got)


@needs_ebpf
def test_open_flag_filter_reports_only_creating_opens(tree):
    base, w = tree
    open(os.path.join(w, "old"), "w").close()

    def work():
        subprocess.run([sys.executable, "-c", f"open({w + '/old'!r}, 'r+').close(); "
                        f"open({w + '/new'!r}, 'w').close()"], check=True)
    got = traced(base, w, "-a always,exit -F dir={w} -S openat -F a2&0100 -k created\n"
                          "-w {w}/zz-marker", work)
    assert [(e["op"], e["path"]) for e in got] == [("create", f"{w}/new")]
