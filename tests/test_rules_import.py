"""`rules import` and `rules check --keep-going` on rules written as Linux audit users
write them (the forms of the STIG, OSPP and PCI-DSS sets)."""
import os
import subprocess
import sys

from tracehelp import REPO

from fswatchaudit.rules import RuleSet, load, parse_line
from fswatchaudit.rules.importer import commands, import_rules

AUDIT_RULES = """\
## kernel settings
-D
-b 8192
--backlog_wait_time 60000
-f 1
## identity
-w /etc/passwd -p wa -k identity
-w /etc/shadow -p wa -k identity
## deletes by people
-a always,exit -F arch=b32 -S unlink,unlinkat,rename,renameat -F auid>=1000 -F auid!=unset -F key=delete
-a always,exit -F arch=b64 -S unlink,unlinkat,rename,renameat -F auid>=1000 -F auid!=-1 -F key=delete
## failed creations
-a always,exit -F arch=b64 -S openat,open_by_handle_at -F a2&0100 -F exit=-EACCES -F auid>=1000 -F auid!=unset -F key=unsuccessful-create
-a always,exit -F arch=b64 -S creat -F exit=-EPERM -F auid>=1000 -F auid!=unset -F key=unsuccessful-create
## time, not files
-a always,exit -F arch=b64 -S adjtimex,settimeofday -F key=time-change
## mixed: the file syscall stays
-a always,exit -F arch=b64 -S chmod,adjtimex -F auid>=1000 -F key=perm
## exclusions
-a never,exit -F arch=b64 -S all -F exe=/usr/sbin/chronyd
-a always,exit -F arch=b64 -S execve -C uid!=euid -F euid=0 -F key=setuid
-a always,exit -F dir=/etc -F perm=wa -F auid>=1000 -F auid!=unset -k etc
-a always,exit -F dir=/etc -F perm=wa -F auid>=1000 -F auid!=unset -k etc
-e 2
"""


def reasons(lines):
    return {line.number: line.reason for line in lines if line.reason}


def test_import_keeps_every_file_rule_and_says_why_for_the_rest(tmp_path):
    src = tmp_path / "audit.rules"
    src.write_text(AUDIT_RULES)
    lines = import_rules([str(src)])
    kept = [line.rule for line in lines if line.kept]
    assert kept == [
        "-w /etc/passwd -p wa -k identity",
        "-w /etc/shadow -p wa -k identity",
        "-a always,exit -F arch=b32 -F auid>=1000 -F auid!=4294967295 "
        "-S unlink,unlinkat,rename,renameat -k delete",
        "-a always,exit -F arch=b64 -F auid>=1000 -F auid!=4294967295 "
        "-S unlink,unlinkat,rename,renameat -k delete",
        "-a always,exit -F arch=b64 -F auid>=1000 -F auid!=4294967295 -F exit=-EACCES "
        "-F a2&0100 -S openat,open_by_handle_at -k unsuccessful-create",
        "-a always,exit -F arch=b64 -F auid>=1000 -F auid!=4294967295 -F exit=-EPERM "
        "-S creat -k unsuccessful-create",
        "-a always,exit -F arch=b64 -F auid>=1000 -S chmod -k perm",
        "-a always,exit -F arch=b64 -F euid=0 -C uid!=euid -S execve -k setuid",
        "-a always,exit -F arch=b64 -F dir=/etc -F perm=wa -F auid>=1000 "
        "-F auid!=4294967295 -k etc",
    ]
    why = reasons(lines)
    assert "implied" in why[2]                                    # -D
    assert why[3].startswith("-b 8192: no effect here") and "ring_buffer_size" in why[3]
    assert "never makes a process wait" in why[4]
    assert "never a panic" in why[5]
    assert why[16] == "not a file-system rule: adjtimex, settimeofday are not audited " \
                      "by this product"
    assert why[18].startswith("kept without adjtimex")
    assert "no exclusions" in why[20]
    assert 21 not in why                                          # -C is kept
    assert why[23] == f"the same rule as {src}:22"
    assert why[24].startswith("-e 2: no effect here")
    # what is kept loads as one rule set
    rs = RuleSet()
    rs.apply(commands(lines))
    assert len(rs) == 9


def test_import_cli_exit_codes_and_output_directory(tmp_path):
    d = tmp_path / "rules.d"
    d.mkdir()
    (d / "10-base.rules").write_text("-D\n-b 8192\n")
    (d / "30-files.rules").write_text("-w /etc/passwd -p wa -k identity\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "fswatchaudit", "rules", "import",
                        "-o", str(out), str(d)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1, r.stderr                       # two lines left out
    assert "10-base.rules:2: left out: -b 8192: no effect here" in r.stderr
    assert "1 rules imported, 2 lines left out" in r.stderr
    assert os.listdir(out) == ["30-files.rules"]
    written = (out / "30-files.rules").read_text().splitlines()
    assert written[1] == "-w /etc/passwd -p wa -k identity"
    # the imported files are rules files of this product
    r = subprocess.run([sys.executable, "-m", "fswatchaudit", "rules", "check", str(out)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout == "-w /etc/passwd -p wa -k identity\n"
    r = subprocess.run([sys.executable, "-m", "fswatchaudit", "rules", "import",
                        str(out / "30-files.rules")], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 0 and "-w /etc/passwd -p wa -k identity" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fswatchaudit", "rules", "import",
                        str(tmp_path / "missing.rules")], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 2 and "cannot read rules file" in r.stderr


def test_check_keep_going_reports_every_problem(tmp_path):
    a = tmp_path / "a.rules"
    a.write_text("-w /etc/passwd -p q\n-w /etc/group -p wa\n-a always,exit -S mkdri -F dir=/x\n")
    b = tmp_path / "b.rules"
    b.write_text("-w /etc/group -p wa\n-b 320\n-a always,exit -F dir=/x -F uid=nosuchuser\n")
    r = subprocess.run([sys.executable, "-m", "fswatchaudit", "rules", "check",
                        "--keep-going", str(a), str(b)], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 2
    assert f"{a}:1: bad permission letters 'q'" in r.stderr
    assert f"{a}:3: unknown syscall or alias 'mkdri' (did you mean 'mkdir'?)" in r.stderr
    assert f"{b}:1: duplicate rule: -w /etc/group -p wa" in r.stderr
    assert f"{b}:3: no user named 'nosuchuser'" in r.stderr
    assert f"note: {b}:2: -b 320: no effect here" in r.stderr
    assert "4 problem(s)" in r.stderr
    r = subprocess.run([sys.executable, "-m", "fswatchaudit", "rules", "check", str(a),
                        str(b)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stderr.count("fswatchaudit:") == 1   # the first only


def test_open_flag_fields_only_on_open_syscalls():
    import pytest

    from fswatchaudit.rules import RuleError
    r = parse_line("-a always,exit -S open -F a1&01003 -F dir=/srv").rule
    assert r.text() == "-a always,exit -F arch=b64 -F dir=/srv -F a1&01003 -S open"
    with pytest.raises(RuleError, match="a2 is understood only as the open flags"):
        parse_line("-a always,exit -S unlink -F a2&0100 -F dir=/srv")


# --- the example rules Linux audit ships ------------------------------------------------
# Debian's auditd package installs upstream's rules/*.rules (GPL-2, see
# /usr/share/doc/auditd/copyright); scripts/setup takes them from the package where an
# image leaves /usr/share/doc out.  They are read in place, never copied into the tree.
EXAMPLES = "usr/share/doc/auditd/examples/rules"

# the file syscalls these sets name, written out here rather than taken from the
# product's tables, so that a syscall the tables forgot shows as a lost rule
FILE_SYSCALLS = set("""
open openat openat2 creat open_by_handle_at truncate ftruncate
unlink unlinkat rmdir rename renameat renameat2 link linkat symlink symlinkat
mkdir mkdirat mknod mknodat chmod fchmod fchmodat fchmodat2 chown fchown fchownat lchown
setxattr lsetxattr fsetxattr removexattr lremovexattr fremovexattr
""".split())


def upstream_examples() -> list[str]:
    for root in ("/", os.path.join(REPO, ".fixtures", "auditd")):
        where = os.path.join(root, EXAMPLES)
        if os.path.isdir(where):
            return sorted(os.path.join(where, name) for name in os.listdir(where)
                          if name.endswith(".rules"))
    raise AssertionError(f"Linux audit's example rules are missing (/{EXAMPLES}): "
                         "run scripts/setup, which installs auditd")


def is_file_system_rule(text: str) -> bool:
    """A rule line that Linux audit would apply to file-system objects."""
    tokens = text.split()
    if not tokens or tokens[0] not in ("-w", "-a", "-A"):
        return False
    if tokens[0] == "-w":
        return True
    if "never" in tokens[1].split(",") or "exit" not in tokens[1].split(","):
        return False
    syscalls = {name for i, tok in enumerate(tokens[:-1]) if tok == "-S"
                for name in tokens[i + 1].split(",")}
    if syscalls & FILE_SYSCALLS:
        return True
    return not syscalls and any(tok.startswith(("path=", "dir=")) for tok in tokens)


# why a line may be left out; anything else is a lost rule
ACCEPTED_REASONS = ("not a file-system rule", "no effect here", "is implied",
                    "is not supported: this product only reports what always,exit")


def test_upstream_example_rules_import_keep_every_file_rule_and_load_on_ebpf(tmp_path):
    files = upstream_examples()
    assert len(files) >= 30, files
    kept: list[str] = []
    file_rules = 0
    for path in files:
        lines = import_rules([path])
        for line in lines:
            if is_file_system_rule(line.text):
                file_rules += 1
                assert line.kept, f"{path}:{line.number}: {line.text}: {line.reason}"
            if not line.kept:
                assert line.reason and any(r in line.reason for r in ACCEPTED_REASONS), \
                    f"{path}:{line.number}: {line.text}: {line.reason}"
                continue
            assert line.rule is not None
            kept.append(line.rule)
            # a kept rule selects what the original did: same keys, same filters
            for tok in line.text.split():
                if tok.startswith(("key=", "auid>=", "dir=", "path=", "exit=", "success=")):
                    value = tok if not tok.startswith("key=") else "-k " + tok[4:]
                    if tok.startswith(("dir=", "path=")):
                        value = value.rstrip("/") or "/"      # paths are normalised
                    assert value.replace("unset", "4294967295") in line.rule, \
                        (line.text, line.rule)
        # each file alone is a rules file of this product
        out = tmp_path / os.path.basename(path)
        out.write_text("".join(line.rule + "\n" for line in lines if line.rule))
        assert len(load([str(out)]).rules) == sum(1 for line in lines if line.kept)
    assert file_rules >= 150, file_rules            # the sets are mostly file rules
    # every kept rule of every file at once (the sets overlap: each rule once), on the
    # eBPF backend: nothing refused, the path-less ones filtered in the kernel; and the
    # command line says the same as the library
    r = subprocess.run([sys.executable, "-m", "fswatchaudit", "rules", "import", *files],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and "lines left out" in r.stderr, r.stderr   # some left out
    assert set(r.stdout.splitlines()) - {""} >= set(kept)
    # rules on directories this host does not have (/etc/sysconfig on Debian) are
    # refused at start, as auditctl refuses them: they are set aside, and said why
    from fswatchaudit.rules import RuleError
    from fswatchaudit.wiring import check_targets
    loadable, absent = [], []
    for text in dict.fromkeys(kept):
        one = RuleSet()
        one.add(parse_line(text).rule)
        try:
            check_targets(one)
            loadable.append(text)
        except RuleError as exc:
            assert "does not exist" in str(exc), exc
            absent.append(text)
    assert len(absent) <= 5 and len(loadable) >= 100, absent
    union = tmp_path / "all.rules"
    union.write_text("".join(rule + "\n" for rule in loadable))
    from tracehelp import Trace
    trace = Trace("--backend", "ebpf", "-r", str(union), timeout=120)
    events, stderr, code = trace.stop()
    assert code == 0, stderr
    assert "refus" not in stderr, stderr
