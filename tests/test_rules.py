"""Rule language, alias expansion and rule matching: pure logic."""
import os

import pytest

from fswatchaudit import syscalls
from fswatchaudit.events import Event
from fswatchaudit.rules import RuleError, RuleSet, load, parse_line, read_files


def rule(text, **kw):
    return parse_line(text, **kw).rule


# -- aliases -----------------------------------------------------------------------

def test_fs_create_expands_to_modern_variants():
    calls, ops = syscalls.expand_syscall("fs-create")
    for name in ("creat", "open", "openat", "openat2", "link", "linkat", "mkdir", "mkdirat",
                 "mknod", "mknodat", "rename", "renameat", "renameat2", "symlink",
                 "symlinkat"):
        assert name in calls
    assert ops == {"create", "mkdir", "mknod", "symlink", "link", "rename"}
    assert "open" not in ops  # only opens with O_CREAT, i.e. the op "create"


def test_fs_remove_and_fs_attr():
    calls, ops = syscalls.expand_syscall("fs-remove")
    assert {"rename", "renameat", "renameat2", "rmdir", "unlink", "unlinkat"} <= calls
    assert ops == {"rename", "rmdir", "unlink"}
    calls, ops = syscalls.expand_syscall("fs-attr")
    assert {"chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown",
            "fchownat", "setxattr", "lsetxattr", "fsetxattr", "setxattrat", "removexattr",
            "lremovexattr", "fremovexattr", "removexattrat", "truncate", "ftruncate",
            "utime", "utimes", "futimesat", "utimensat"} <= calls
    assert ops == syscalls.ATTR_OPS


def test_fs_all_is_the_union():
    calls, ops = syscalls.expand_syscall("fs-all")
    union = set()
    for a in ("fs-create", "fs-remove", "fs-attr"):
        union |= syscalls.expand_syscall(a)[0]
    assert calls == union
    assert ops == syscalls.CREATE_OPS | syscalls.REMOVE_OPS | syscalls.ATTR_OPS


def test_single_syscalls():
    assert syscalls.expand_syscall("rmdir") == ({"rmdir", "unlinkat"}, {"rmdir"})
    assert syscalls.expand_syscall("unlinkat")[1] == {"unlink", "rmdir"}
    assert syscalls.expand_syscall("chmod")[0] == {"chmod", "fchmodat", "fchmodat2"}
    with pytest.raises(KeyError):
        syscalls.expand_syscall("mkdri")


def test_rename_belongs_to_create_and_remove():
    assert syscalls.aliases_for_op("rename") == ["fs-create", "fs-remove"]
    assert syscalls.aliases_for_op("chmod") == ["fs-attr"]
    assert syscalls.aliases_for_op("open") == ["open"]
    assert syscalls.aliases_for_op("exec") == ["exec"]


def test_perm_classes():
    assert syscalls.perms_for("open", "r") == {"r"}
    assert syscalls.perms_for("open", "rw") == {"r", "w"}
    assert syscalls.perms_for("chmod") == {"w", "a"}
    assert syscalls.perms_for("unlink") == {"w"}
    assert syscalls.perms_for("exec") == {"x"}


# -- parsing -----------------------------------------------------------------------

def test_watch_rule(tmp_path):
    r = rule(f"-w {tmp_path} -p wa -k mykey")
    assert r.kind == "dir" and r.target == str(tmp_path)
    assert r.perms == {"w", "a"} and r.key == "mykey"
    f = tmp_path / "f"
    f.write_text("")
    assert rule(f"-w {f}").kind == "path"
    assert rule(f"-w {f}").perms == set("rwxa")
    assert rule(f"-w {tmp_path}/missing").kind == "path"


def test_syscall_rule():
    r = rule("-a always,exit -F arch=b64 -F dir=/srv -S fs-create -S unlink,rmdir -k srv")
    assert r.kind == "dir" and r.target == "/srv" and r.key == "srv"
    assert r.ops == syscalls.CREATE_OPS | {"unlink", "rmdir"}
    assert "unlinkat" in r.syscalls and "mkdirat" in r.syscalls
    assert r.text() == "-a always,exit -F arch=b64 -F dir=/srv -S fs-create,unlink,rmdir -k srv"


def test_inode_rule_with_dev():
    r = rule("-a always,exit -F inode=1234 -F dev=8:1 -F perm=wa")
    assert (r.kind, r.inode, r.dev) == ("inode", 1234, os.makedev(8, 1))
    assert r.perms == {"w", "a"}


def test_inode_rule_defaults_to_root_device():
    r = rule("-a exit,always -F inode=5")
    assert r.dev == os.stat("/").st_dev


def test_normalised_text_round_trips(tmp_path):
    for text in (f"-w {tmp_path} -p wa -k k1",
                 "-a always,exit -F arch=b64 -F path=/etc/passwd -F perm=r -S open -k pw",
                 "-a always,exit -F arch=b64 -F inode=7 -F dev=8:1"):
        r = rule(text)
        assert rule(r.text()).identity() == r.identity()


@pytest.mark.parametrize("text, message", [
    ("-w etc/passwd", "relative"),
    ("-a always,exit -F path=relative", "relative"),
    ("-a always,exit -F path=/a -F inode=3", "inode= cannot be combined"),
    ("-a always,exit -F dir=/a -F inode=3", "inode= cannot be combined"),
    ("-a always,exit -F dir=/a -S mkdri", "did you mean 'mkdir'"),
    ("-a always,exit -F dir=/a -S fs-craete", "did you mean 'fs-create'"),
    ("-w /a -p rwz", "bad permission letters"),
    ("-a always,exit -F dir=/a -F perm=q", "bad permission letters"),
    ("-w /a --frobnicate", "unknown option '--frobnicate'"),
    ("-a always,exit -F colour=red", "unsupported field 'colour'"),
    ("-a never,exit -F dir=/a", "only 'always,exit'"),
    ("-a always,exit -F perm=w", "needs -F path="),
    ("-a always,exit -F dir=/a -F path=/b", "only one of"),
    ("-a always,exit -F inode=abc", "bad inode"),
    ("-a always,exit -F inode=3 -F dev=8", "expected MAJOR:MINOR"),
    ("-w", "needs a value"),
    ("-p wa", "no action"),
    ("-w /a -w /b", "cannot be combined"),
    ("-w /a -S open", "cannot be combined"),
    ("-l -k x", "takes no other options"),
    ("-w /a -k", "needs a value"),
    ("-w '/a", "cannot split"),
])
def test_errors(text, message):
    with pytest.raises(RuleError) as info:
        parse_line(text, "f.rules", 7)
    assert message in str(info.value)
    assert str(info.value).startswith("f.rules:7: ")


def test_duplicate_rule_refused():
    rs = RuleSet()
    rs.apply([parse_line("-w /x -p wa -k a")])
    with pytest.raises(RuleError, match="duplicate rule"):
        rs.apply([parse_line("-w /x -p wa -k a")])
    # a different key is a different rule
    rs.apply([parse_line("-w /x -p wa -k b")])
    assert len(rs) == 2


def test_delete_and_list_and_delete_all():
    rs = RuleSet()
    listed = rs.apply([parse_line(t) for t in (
        "-w /x -p wa -k a", "-a always,exit -F dir=/y -S fs-remove", "-l")])
    assert listed == ["-w /x -p wa -k a", "-a always,exit -F arch=b64 -F dir=/y -S fs-remove"]
    rs.apply([parse_line("-W /x -p wa -k a")])
    assert rs.texts() == ["-a always,exit -F arch=b64 -F dir=/y -S fs-remove"]
    with pytest.raises(RuleError, match="no such rule"):
        rs.apply([parse_line("-d always,exit -F dir=/y -S fs-create")])
    rs.apply([parse_line("-D")])
    assert len(rs) == 0


def test_file_loads_atomically_with_line_numbers(tmp_path):
    good = tmp_path / "10-good.rules"
    good.write_text("# comment\n\n-w /etc/passwd -p wa -k passwd\n")
    bad = tmp_path / "20-bad.rules"
    bad.write_text("-w /etc/group -k group\n-w relative/path\n")
    with pytest.raises(RuleError) as info:
        load([str(tmp_path)])
    assert str(info.value) == f"{bad}:2: watch path 'relative/path' is relative: " \
                              "rules need absolute paths"
    rs = RuleSet()
    rs.apply(read_files([str(good)]))
    before = rs.texts()
    with pytest.raises(RuleError):
        rs.apply(read_files([str(tmp_path)]))
    assert rs.texts() == before  # nothing from the failing load was applied


def test_duplicate_across_files_names_the_line(tmp_path):
    (tmp_path / "a.rules").write_text("-w /srv -k s\n")
    (tmp_path / "b.rules").write_text("\n-w /srv -k s\n")
    with pytest.raises(RuleError) as info:
        load([str(tmp_path)])
    assert str(info.value).startswith(f"{tmp_path}/b.rules:2: duplicate rule")


def test_rules_d_order(tmp_path):
    (tmp_path / "20.rules").write_text("-w /b\n")
    (tmp_path / "10.rules").write_text("-w /a\n")
    (tmp_path / "notes.txt").write_text("not a rule\n")
    assert load([str(tmp_path)]).texts() == ["-w /a", "-w /b"]


# -- matching ----------------------------------------------------------------------

def ev(op, path, path2=None, access=None, syscall=None, ino=None, dev=None):
    return Event(op=op, path=path, path2=path2, access=access, syscall=syscall,
                 backend="test", ino=ino, dev=dev)


def test_dir_rule_matches_subtree_only():
    r = rule("-a always,exit -F dir=/srv/data")
    assert r.matches(ev("create", "/srv/data/a/b/c"))
    assert r.matches(ev("rmdir", "/srv/data"))
    assert not r.matches(ev("create", "/srv/database"))
    assert r.matches(ev("rename", "/tmp/x", "/srv/data/x"))  # moved in


def test_path_rule_matches_entry_only():
    r = rule("-a always,exit -F path=/etc/passwd")
    assert r.matches(ev("rename", "/etc/passwd.tmp", "/etc/passwd"))
    assert not r.matches(ev("create", "/etc/passwd/x"))


def test_perm_filter():
    w = rule("-a always,exit -F dir=/d -F perm=w")
    a = rule("-a always,exit -F dir=/d -F perm=a")
    r = rule("-a always,exit -F dir=/d -F perm=r")
    x = rule("-a always,exit -F dir=/d -F perm=x")
    assert w.matches(ev("open", "/d/f", access="w"))
    assert not w.matches(ev("open", "/d/f", access="r"))
    assert r.matches(ev("open", "/d/f", access="r")) and not r.matches(ev("unlink", "/d/f"))
    assert a.matches(ev("chmod", "/d/f")) and not a.matches(ev("unlink", "/d/f"))
    assert w.matches(ev("chmod", "/d/f")) and w.matches(ev("unlink", "/d/f"))
    assert x.matches(ev("exec", "/d/f")) and not x.matches(ev("open", "/d/f", access="r"))


def test_syscall_filter_uses_known_syscall():
    r = rule("-a always,exit -F dir=/d -S unlink")
    assert r.matches(ev("unlink", "/d/f", syscall="unlinkat"))
    assert not r.matches(ev("rmdir", "/d/f", syscall="unlinkat"))   # op is not in the rule
    assert not r.matches(ev("chmod", "/d/f", syscall="chmod"))
    c = rule("-a always,exit -F dir=/d -S chmod")
    assert not c.matches(ev("chmod", "/d/f", syscall="fchmod"))     # fchmod was not asked for
    assert c.matches(ev("chmod", "/d/f"))                            # syscall unknown: op decides


def test_inode_rule_matches_inode_and_device():
    r = rule("-a always,exit -F inode=42 -F dev=8:1")
    assert r.matches(ev("chmod", "/anywhere", ino=42, dev=os.makedev(8, 1)))
    assert not r.matches(ev("chmod", "/anywhere", ino=42, dev=os.makedev(8, 2)))


def test_ruleset_digest_is_order_independent():
    a, b = RuleSet(), RuleSet()
    a.apply([parse_line("-w /x"), parse_line("-w /y")])
    b.apply([parse_line("-w /y"), parse_line("-w /x")])
    assert a.digest() == b.digest()


def test_kernel_matched_rules_decide_whatever_the_names():
    rs = RuleSet()
    rs.apply([parse_line("-a always,exit -F dir=/srv -F perm=w -k srv"),
              parse_line("-a always,exit -F path=/etc/passwd -S chmod -k pw"),
              parse_line("-a always,exit -F dir=/var -k var")])
    ids = {r.key: rid for rid, r in rs.items()}
    # reached through a hard link or a bind mount: the path is under no rule, the kernel
    # matched the objects of srv and pw; the other parts of each rule still apply
    e = ev("chmod", "/mnt/bind/alias", syscall="chmod")
    e.rule_ids = (ids["srv"], ids["pw"])
    assert rs.select(e).keys == ["pw", "srv"]
    e = ev("open", "/elsewhere/alias", access="r", syscall="openat")
    e.rule_ids = (ids["srv"], ids["pw"])        # read: not perm w; open: not chmod
    assert rs.select(e) is None
    # the kernel matched no rule: the names do not bring one in
    e = ev("chmod", "/var/x", syscall="chmod")
    e.rule_ids = ()
    assert rs.select(e) is None
    # a rule removed since the kernel matched it is ignored
    e = ev("chmod", "/srv/x", syscall="chmod")
    e.rule_ids = (999, ids["var"])
    assert rs.select(e).keys == ["var"]
    # no kernel verdict (fanotify, inotify): the names decide, as before
    assert rs.select(ev("chmod", "/var/x", syscall="chmod")).keys == ["var"]


def test_matches_object_is_the_object_part_only():
    r = rule("-a always,exit -F dir=/d -S unlink")
    assert r.matches_object(ev("chmod", "/d/f"))
    assert not r.matches_object(ev("chmod", "/e/f"))
    assert r.matches(ev("unlink", "/e/f"), objects=False)
    assert not r.matches(ev("chmod", "/d/f"), objects=False)
