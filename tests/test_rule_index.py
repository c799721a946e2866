"""The rule index: RuleSet.select finds the rules an event may concern by its paths and
inode, and decides exactly as a scan of every rule would; rule changes keep it in step;
applying rules one command at a time is linear."""
from __future__ import annotations

import itertools
import random

import pytest

from fswatchaudit.events import Event
from fswatchaudit.rules import Command, RuleError, RuleSet, parse_line

LINES = [
    "-a always,exit -F dir=/srv/a -F perm=wa -k a",
    "-a always,exit -F dir=/srv/a/b -F perm=r -k ab",
    "-w /srv/a/b/c.txt -p wa -k file",
    "-a always,exit -F path=/srv/x/y -F perm=a -k px",
    "-a always,exit -F dir=/srv -F uid=1000 -k srv1000",
    "-a always,exit -F dir=/ -F perm=x -k root",
    "-a always,exit -F dir=/srv/a/ -S renameat2 -k ren",
    "-a always,exit -F inode=77 -F dev=8:1 -k ino",
]
PATHS = [None, "/", "/srv", "/srv/a", "/srv/a/", "/srv/ab", "/srv/a/b", "/srv/a/b/c.txt",
         "/srv/a/b/c.txtx", "/srv/x/y", "/srv/x/y/z", "/etc/passwd", "rel/a", "/srv//a"]
OPS = [("create", "openat"), ("open", "openat"), ("chmod", "fchmodat"),
       ("rename", "renameat2"), ("exec", "execve"), ("unlink", "unlinkat")]


def ruleset(lines=LINES) -> RuleSet:
    rs = RuleSet()
    rs.apply([parse_line(line) for line in lines])
    return rs


def scan(rs: RuleSet, ev: Event) -> list:
    return [r for r in rs.rules.values() if r.matches(ev)]


def events():
    for path, path2, (op, sc), uid, ino in itertools.product(
            PATHS, [None, "/srv/a/b/new", "/tmp/q"], OPS, [0, 1000], [None, 77]):
        if path is None and path2 is not None:
            continue
        yield Event(op=op, path=path, path2=path2, backend="t", syscall=sc, uid=uid,
                    ino=ino, dev=0x801, access="w" if op == "open" else None)


def test_the_index_decides_as_a_scan_of_every_rule():
    rs = ruleset()
    n = 0
    for ev in events():
        assert rs.match(ev) == scan(rs, ev), ev
        n += bool(scan(rs, ev))
    assert n > 100          # most events are selected by some rule: the test has teeth


def test_the_index_follows_rule_changes():
    rs = ruleset()
    ev = Event(op="create", path="/srv/a/b/c.txt", backend="t", syscall="openat")
    assert sorted(r.key for r in rs.match(ev)) == ["a", "file"]
    rs.apply([parse_line("-d always,exit -F dir=/srv/a -F perm=wa -k a")])
    assert [r.key for r in rs.match(ev)] == ["file"]
    rs.apply([parse_line("-a always,exit -F dir=/srv/a/b -F perm=wa -k new")])
    assert [r.key for r in rs.match(ev)] == ["file", "new"]
    rs.rules = {1: parse_line("-a always,exit -F dir=/srv -k only").rule}  # all replaced
    assert [r.key for r in rs.match(ev)] == ["only"]
    rs.apply([Command("delete-all")])
    assert rs.match(ev) == []


def test_random_rule_sets_agree_with_the_scan():
    rnd = random.Random(13)
    dirs = ["/d", "/d/e", "/d/e/f", "/g", "/g/h", "/d/ef"]
    for _ in range(30):
        lines = set()
        for _ in range(rnd.randint(1, 12)):
            d = rnd.choice(dirs)
            lines.add(rnd.choice([f"-a always,exit -F dir={d} -F perm=wa",
                                  f"-w {d}/file -p rwa",
                                  f"-a always,exit -F dir={d} -F uid=0",
                                  f"-a always,exit -F path={d}"]) + f" -k {d}")
        rs = ruleset(sorted(lines))
        for _ in range(200):
            path = rnd.choice(dirs) + rnd.choice(["", "/file", "/x/y", "/file/z"])
            ev = Event(op=rnd.choice(["create", "chmod", "open"]), path=path,
                       path2=rnd.choice([None, rnd.choice(dirs) + "/n"]), backend="t",
                       uid=rnd.choice([0, 5]), access="r")
            assert rs.match(ev) == scan(rs, ev), (sorted(lines), ev)


def test_candidates_do_not_grow_with_the_rule_count():
    rs = ruleset([f"-a always,exit -F dir=/srv/d{i} -F perm=wa -k k{i}"
                  for i in range(10_000)])
    ev = Event(op="create", path="/srv/d1234/f", backend="t", syscall="openat")
    assert [r.key for r in rs.index().candidates(ev)] == ["k1234"]
    assert [r.key for r in rs.match(ev)] == ["k1234"]
    assert rs.index().candidates(Event(op="create", path="/elsewhere", backend="t")) == []


def test_one_command_applies_in_place_and_atomically():
    rs = ruleset()
    table = rs.rules
    rs.apply([parse_line("-w /new -k n")])
    assert rs.rules is table                  # no copy of every rule per command
    before = dict(rs.rules)
    with pytest.raises(RuleError):
        rs.apply([parse_line("-w /new -k n")])        # a duplicate changes nothing
    assert dict(rs.rules) == before
    with pytest.raises(RuleError):
        rs.apply([parse_line("-w /new2 -k n2"), parse_line("-W /absent")])
    assert dict(rs.rules) == before                   # several: all or nothing
