"""Real-world workloads under Linux audit and the eBPF backend at once, compared.

Linux audit is the reference users trust: for each workload, every syscall that
`auditctl -w DIR -p wa` records (failed ones included) must be in our trace too, from the
same process, with the same outcome, on a name audit gives, and with the same uid,
loginuid, comm and exe.  What we record that audit does not is listed per operation in
the failure message of the extras test, and in the README.
"""
from __future__ import annotations

import collections
import os
import shutil
import subprocess
import tarfile
import time

import pytest
from linux_audit import Auditd, AuditEvent, audit_events, auditctl
from tracehelp import Trace

from fswatchaudit.syscalls import syscall_numbers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (eBPF, auditd)")

KEY = "cmp"
SYSCALL_NAMES = {nr: name for name, nr in syscall_numbers().items()}
AUDIT_ARCH_X86_64 = b"c000003e"


@pytest.fixture(scope="module")
def auditd(tmp_path_factory):
    if not shutil.which("auditd"):
        pytest.fail("auditd is not installed (scripts/setup installs it)")
    with Auditd(str(tmp_path_factory.mktemp("auditd"))) as aud:
        if aud.log is None:
            pytest.fail("an auditd already runs on this host: its log is not ours to read")
        yield aud


def run_both(aud: Auditd, watches: list[str], command: list[str], cwd: str,
             env: dict[str, str] | None = None) -> tuple[list[AuditEvent], list[dict]]:
    """Run command with `-w W -p wa -k cmp` in Linux audit and in our trace at once."""
    since = aud.size()
    rules = [["-w", w, "-p", "wa", "-k", KEY] for w in watches]
    for rule in rules:
        auditctl(*rule)
    rules_file = os.path.join(cwd, "..", "cmp.rules")
    with open(rules_file, "w") as fh:
        fh.write("".join(" ".join(r) + "\n" for r in rules))
    trace = Trace("--backend", "ebpf", "-r", rules_file)
    try:
        subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=300)
        time.sleep(1.5)                 # the consumer reads the ring once a while
    finally:
        for rule in rules:
            auditctl("-W", *rule[1:], check=False)
        ours, err, code = trace.stop()
    assert code == 0, err
    aud.settle(since)
    return audit_events(aud.read(since), KEY), ours


def outcome_matches(a: AuditEvent, ev: dict) -> bool:
    result = ev.get("result")
    if result is None:
        return False
    return result >= 0 if a.success else result == a.num("exit")


def names_agree(audit_names: set[bytes], ev: dict) -> bool:
    """One of audit's names is one of ours, or (a name relative to a directory audit
    does not record) the end of one of ours."""
    ours = [os.fsencode(ev[k]) for k in ("path", "path2") if ev.get(k)]
    if not audit_names or not ours:
        return True
    return any(o == a or (not a.startswith(b"/") and o.endswith(b"/" + a))
               for a in audit_names for o in ours)


def missing_from_ours(audit: list[AuditEvent], ours: list[dict]) -> list[str]:
    """Audit events with no counterpart in ours, one line each."""
    unused = list(ours)
    missing = []
    for a in audit:
        if a.fields.get("arch") != AUDIT_ARCH_X86_64:
            missing.append(f"arch {a.fields.get('arch')!r} not compared")
            continue
        name = SYSCALL_NAMES.get(a.num("syscall"), a.fields["syscall"].decode())
        names = a.names()
        found = None
        for ev in unused:
            if (ev.get("pid") == a.num("pid") and ev.get("syscall") == name
                    and outcome_matches(a, ev)
                    and names_agree(names, ev)):
                found = ev
                break
        what = (f"{name} pid={a.num('pid')} comm={a.fields.get('comm')!r} "
                f"success={a.fields.get('success')!r} exit={a.fields.get('exit')!r} "
                f"names={sorted(names)}")
        if found is None:
            missing.append("missing: " + what)
            continue
        unused.remove(found)
        for ours_key, audit_key in (("uid", "uid"), ("loginuid", "auid")):
            if found.get(ours_key) != a.num(audit_key):
                missing.append(f"{ours_key} {found.get(ours_key)} != {a.num(audit_key)}: "
                               + what)
        for key in ("comm", "exe"):
            if os.fsencode(found.get(key) or "") != a.fields.get(key):
                missing.append(f"{key} {found.get(key)!r} differs: " + what)
    return missing


def extras(audit: list[AuditEvent], ours: list[dict]) -> collections.Counter:
    """What we reported beyond audit, by (op, syscall): counts only."""
    seen = collections.Counter((SYSCALL_NAMES.get(a.num("syscall")), a.num("pid"))
                               for a in audit)
    out: collections.Counter = collections.Counter()
    for ev in ours:
        k = (ev.get("syscall"), ev.get("pid"))
        if seen[k]:
            seen[k] -= 1
        else:
            out[(ev.get("op"), ev.get("syscall"))] += 1
    return out


def assert_audit_covered(audit: list[AuditEvent], ours: list[dict]) -> None:
    assert audit, "Linux audit recorded nothing: the comparison would prove nothing"
    missing = missing_from_ours(audit, ours)
    assert not missing, (f"{len(missing)} of {len(audit)} audit events not matched:\n"
                         + "\n".join(missing[:40]))


# -- workloads in a watched directory ------------------------------------------------------

def make_source_tree(root: str) -> str:
    """Files, an executable, a hard link, a symlink, odd modes and a nested directory."""
    src = os.path.join(root, "src")
    os.makedirs(os.path.join(src, "sub", "deeper"))
    for i in range(5):
        with open(os.path.join(src, f"file{i}.txt"), "w") as fh:
            fh.write(f"content {i}\n" * 50)
    with open(os.path.join(src, "sub", "run.sh"), "w") as fh:
        fh.write("#!/bin/sh\necho hi\n")
    os.chmod(os.path.join(src, "sub", "run.sh"), 0o755)
    os.link(os.path.join(src, "file0.txt"), os.path.join(src, "sub", "hardlink"))
    os.symlink("../file1.txt", os.path.join(src, "sub", "symlink"))
    os.chmod(os.path.join(src, "sub", "deeper"), 0o750)
    return src


@pytest.fixture
def dirs(tmp_path):
    """A watched directory W and, beside it, an unwatched source tree."""
    w = tmp_path / "w"
    w.mkdir()
    return str(w), make_source_tree(str(tmp_path))


def test_sed_in_place(auditd, dirs):
    w, _src = dirs
    with open(os.path.join(w, "conf"), "w") as fh:
        fh.write("a = 1\nb = 2\n")
    audit, ours = run_both(auditd, [w], ["sed", "-i", "s/a = 1/a = 3/", "conf"], w)
    assert_audit_covered(audit, ours)


def test_tar_extract_with_links(auditd, dirs):
    w, src = dirs
    tarball = os.path.join(os.path.dirname(w), "src.tar")
    with tarfile.open(tarball, "w") as tf:
        tf.add(src, arcname="src")
    audit, ours = run_both(auditd, [w], ["tar", "xf", tarball], w)
    assert_audit_covered(audit, ours)


def test_cp_archive(auditd, dirs):
    w, src = dirs
    audit, ours = run_both(auditd, [w], ["cp", "-a", src, "copy"], w)
    assert_audit_covered(audit, ours)


def test_rsync_hard_links(auditd, dirs):
    w, src = dirs
    audit, ours = run_both(auditd, [w], ["rsync", "-aH", src + "/", "mirror/"], w)
    assert_audit_covered(audit, ours)


def test_git_clone(auditd, dirs):
    w, src = dirs
    env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", HOME=os.path.dirname(w))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q", src], check=True, env=env)
    subprocess.run([*git, "-C", src, "add", "."], check=True, env=env)
    subprocess.run([*git, "-C", src, "commit", "-qm", "x"], check=True, env=env)
    audit, ours = run_both(auditd, [w], [*git, "clone", "-q", "--no-hardlinks", src,
                                         "clone"], w, env=env)
    assert_audit_covered(audit, ours)


def test_python_venv(auditd, dirs):
    w, _src = dirs
    audit, ours = run_both(auditd, [w], ["/usr/bin/python3", "-m", "venv", "--without-pip",
                                         "venv"], w)
    assert_audit_covered(audit, ours)


def test_logrotate(auditd, dirs):
    w, _src = dirs
    log = os.path.join(w, "app.log")
    with open(log, "w") as fh:
        fh.write("line\n" * 1000)
    conf = os.path.join(os.path.dirname(w), "logrotate.conf")
    with open(conf, "w") as fh:
        fh.write(f"{log} {{\n  rotate 2\n  create 0640 root root\n  compress\n}}\n")
    state = os.path.join(os.path.dirname(w), "logrotate.state")
    audit, ours = run_both(auditd, [w], ["logrotate", "-f", "-s", state, conf], w)
    assert_audit_covered(audit, ours)


def test_dpkg_install_and_remove(auditd, dirs):
    w, _src = dirs
    build = os.path.join(os.path.dirname(w), "pkg")
    target = os.path.join(w, "opt")
    os.makedirs(os.path.join(build, "DEBIAN"))
    os.makedirs(os.path.join(build, target.lstrip("/"), "bin"))
    with open(os.path.join(build, "DEBIAN", "control"), "w") as fh:
        fh.write("Package: fswatchaudit-cmp-test\nVersion: 1.0\nArchitecture: all\n"
                 "Maintainer: Test <t@example.org>\nDescription: comparison test\n")
    tool = os.path.join(build, target.lstrip("/"), "bin", "tool")
    with open(tool, "w") as fh:
        fh.write("#!/bin/sh\n")
    os.chmod(tool, 0o755)
    deb = os.path.join(os.path.dirname(w), "cmp.deb")
    subprocess.run(["dpkg-deb", "-b", "--root-owner-group", build, deb], check=True,
                   stdout=subprocess.DEVNULL)
    try:
        audit, ours = run_both(auditd, [w], ["sh", "-c", f"dpkg -i {deb} && "
                                             "dpkg -r fswatchaudit-cmp-test"], w)
    finally:
        subprocess.run(["dpkg", "-P", "fswatchaudit-cmp-test"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    assert_audit_covered(audit, ours)


def test_user_management(auditd, tmp_path):
    """useradd, usermod and userdel with the account files watched one by one."""
    name = "fswacmp"
    subprocess.run(["userdel", "-r", name], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    work = tmp_path / "w"
    work.mkdir()
    script = (f"useradd -M {name} && usermod -c 'audit comparison' {name} && "
              f"userdel {name}")
    try:
        audit, ours = run_both(auditd, ["/etc/passwd", "/etc/shadow", "/etc/group"],
                               ["sh", "-c", script], str(work))
    finally:
        subprocess.run(["userdel", name], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    assert_audit_covered(audit, ours)
