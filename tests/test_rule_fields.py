"""The field table, the option handlers and the rule set's identity index."""
import os

import pytest

from fswatchaudit import rules
from fswatchaudit.events import Event
from fswatchaudit.rules import fields, parse
from fswatchaudit.rules.fields import FIELDS, Field, Where
from fswatchaudit.rules.ruleset import Rule, RuleError, RuleSet, RuleTable

# A value for every row, with the other fields its rule needs.  A new row without an
# entry here fails test_every_row_has_a_sample.
SAMPLES = {
    "arch": ("-F arch=b64 -F dir=/srv", "arch=b64"),
    "path": ("-F path=/etc/passwd", "path=/etc/passwd"),
    "dir": ("-F dir=/srv/data", "dir=/srv/data"),
    "inode": ("-F inode=42 -F dev=8:1", "inode=42"),
    "dev": ("-F inode=42 -F dev=8:1", "dev=8:1"),
    "perm": ("-F dir=/srv -F perm=wa", "perm=wa"),
    "key": ("-F dir=/srv -F key=srv", None),   # written back as -k
    "auid": ("-F dir=/srv -F auid>=1000 -F auid!=unset", "auid!=4294967295"),
    "loginuid": ("-F dir=/srv -F loginuid=0", "loginuid=0"),
    "uid": ("-F dir=/srv -F uid=root", "uid=0"),
    "euid": ("-F dir=/srv -F euid<1000", "euid<1000"),
    "gid": ("-F dir=/srv -F gid=root", "gid=0"),
    "suid": ("-F dir=/srv -F suid=0", "suid=0"),
    "fsuid": ("-F dir=/srv -F fsuid=0", "fsuid=0"),
    "egid": ("-F dir=/srv -F egid=0", "egid=0"),
    "sgid": ("-F dir=/srv -F sgid=0", "sgid=0"),
    "fsgid": ("-F dir=/srv -F fsgid=0", "fsgid=0"),
    "pid": ("-F dir=/srv -F pid=1", "pid=1"),
    "ppid": ("-F dir=/srv -F ppid!=1", "ppid!=1"),
    "exe": ("-F dir=/srv -F exe=/usr/bin/touch", "exe=/usr/bin/touch"),
    "comm": ("-F dir=/srv -F comm=touch", "comm=touch"),
    "success": ("-F dir=/srv -F success=0", "success=0"),
    "exit": ("-F dir=/srv -F exit=-EACCES", "exit=-EACCES"),
    "dev_major": ("-F dir=/srv -F dev_major=8", "dev_major=8"),
    "dev_minor": ("-F dir=/srv -F dev_minor>=1", "dev_minor>=1"),
    "a1": ("-F dir=/srv -S open -F a1&0100", "a1&0100"),
    "a2": ("-F dir=/srv -S openat -F a2&01003", "a2&01003"),
}


def parse_rule(text):
    return rules.parse_line(text, "f.rules", 3).rule


def test_every_row_has_a_sample():
    assert set(SAMPLES) == set(FIELDS)


@pytest.mark.parametrize("name", list(FIELDS))
def test_every_field_parses_and_round_trips(name):
    fields_text, written = SAMPLES[name]
    r = parse_rule(f"-a always,exit {fields_text} -S fs-create")
    again = parse_rule(r.text())
    assert again == r and again.identity() == r.identity()
    assert again.text() == r.text()
    if written is not None:
        assert f"-F {written}" in r.text()
    row = FIELDS[name]
    if row.part is not None:
        assert row.value_of(r) is not None


def test_field_values_set_the_rule_parts():
    r = parse_rule("-a always,exit -F inode=0x10 -F dev=8:1 -F perm=rw -F key=k")
    assert (r.kind, r.inode, r.dev, r.perms, r.key) == \
        ("inode", 16, os.makedev(8, 1), {"r", "w"}, "k")
    assert parse_rule("-a always,exit -F dir=/srv//x/ -F arch=b32").target == "/srv/x"
    assert r.text() == "-a always,exit -F arch=b64 -F inode=16 -F dev=8:1 -F perm=rw -k k"


def test_rows_say_where_they_are_evaluated():
    for name in ("path", "dir", "inode", "dev", "perm", "arch", "auid", "uid", "success"):
        assert FIELDS[name].where == Where.KERNEL | Where.CONSUMER
    assert FIELDS["key"].where == Where.CONSUMER
    assert FIELDS["suid"].where == Where.KERNEL          # no backend reports it yet
    assert FIELDS["uid"].operators == {"=", "!=", "<", ">", "<=", ">="}
    assert FIELDS["path"].operators == {"="}


@pytest.mark.parametrize("text, parts", [
    ("path=/a", ("path", "=", "/a")),
    ("uid!=0", ("uid", "!=", "0")),
    ("uid<=10", ("uid", "<=", "10")),
    ("uid>=10", ("uid", ">=", "10")),
    ("uid<10", ("uid", "<", "10")),
    ("uid>10", ("uid", ">", "10")),
    ("perm&=w", ("perm", "&=", "w")),
    ("perm&w", ("perm", "&", "w")),
    ("path=/a!=b<c", ("path", "=", "/a!=b<c")),   # the first operator splits
    ("a!b=c", ("a!b", "=", "c")),                  # "!" alone is no operator
    ("path=", ("path", "=", "")),
    ("=x", ("", "=", "x")),
    ("path", None),
    ("a!b", None),
])
def test_operator_tokenizer(text, parts):
    assert fields.split_field(text) == parts


@pytest.mark.parametrize("op", ["!=", "<", ">", "<=", ">=", "&", "&="])
@pytest.mark.parametrize("name", list(FIELDS))
def test_refused_operators_name_the_field_and_what_it_takes(name, op):
    row = FIELDS[name]
    if op in row.operators:
        return
    with pytest.raises(RuleError) as info:
        rules.parse_line(f"-a always,exit -F dir=/x -F {name}{op}1", "f.rules", 3)
    assert str(info.value) == (f"f.rules:3: field {name} does not take the operator "
                               f"'{op}' (it takes: {fields.operators_text(row.operators)})")


def test_unknown_field_lists_the_table_and_suggests():
    with pytest.raises(RuleError) as info:
        rules.parse_line("-a always,exit -F pth=/x", "f.rules", 3)
    assert str(info.value) == ("f.rules:3: unsupported field 'pth' (did you mean 'path'?) "
                               f"(supported: {', '.join(FIELDS)})")
    with pytest.raises(RuleError, match="bad field 'path': expected NAME=VALUE"):
        rules.parse_line("-a always,exit -F path")


def test_option_table_and_parse_state():
    assert set(parse.OPTIONS) == {"-w", "-W", "-a", "-A", "-d", "-l", "-D", "-p", "-k",
                                  "-F", "-C", "-S", *parse.CONTROL_NOTES}
    st = parse.read_options(["-a", "always,exit", "-F", "dir=/srv", "-S", "open,fs-remove",
                             "-k", "k"])
    assert (st.action, st.key, st.fields, st.syscall_names) == \
        ("add", "k", {"dir": [("=", "/srv")]}, ["open", "fs-remove"])
    cmd = parse.build(st)
    assert cmd.action == "add" and cmd.rule.target == "/srv"
    with pytest.raises(RuleError, match="-k given twice"):
        parse.read_options(["-w", "/a", "-k", "a", "-k", "b"])
    with pytest.raises(RuleError, match="field dir given twice"):
        parse.read_options(["-a", "always,exit", "-F", "dir=/a", "-F", "dir=/b"])


# -- a comparison field is one row -------------------------------------------------

@pytest.fixture
def uid_field(monkeypatch):
    """A comparison row as one would add it (bit operators too), in place of uid's."""
    row = Field("uid", fields.parse_uint, fields.COMPARE | {"&", "&="},
                Where.KERNEL | Where.CONSUMER, attr="uid")
    monkeypatch.setitem(FIELDS, "uid", row)
    return row


def event(uid=None, path="/srv/f"):
    return Event(op="create", path=path, backend="test", uid=uid)


def test_a_comparison_row_parses_writes_and_matches(uid_field):
    r = parse_rule("-a always,exit -F dir=/srv -F uid>=1000 -k k")
    assert r.conds == (rules.Cond("arch", "=", "b64"), rules.Cond("uid", ">=", 1000))
    assert r.text() == "-a always,exit -F arch=b64 -F dir=/srv -F uid>=1000 -k k"
    assert parse_rule(r.text()) == r
    assert r.matches(event(1000)) and not r.matches(event(999))
    assert not r.matches(event(None))            # unknown: nothing is invented
    assert not r.matches(event(1000, "/elsewhere"))
    ne = parse_rule("-a always,exit -F dir=/srv -F uid!=0")
    assert ne.identity() != parse_rule("-a always,exit -F dir=/srv -F uid=0").identity()
    assert ne.matches(event(5)) and not ne.matches(event(0))
    assert parse_rule("-a always,exit -F dir=/srv -F uid&=6").matches(event(7))
    assert not parse_rule("-a always,exit -F dir=/srv -F uid&=6").matches(event(4))
    assert parse_rule("-a always,exit -F dir=/srv -F uid&4").matches(event(4))
    with pytest.raises(RuleError, match="bad number 'root'"):
        parse_rule("-a always,exit -F dir=/srv -F uid=root")


def test_select_uses_comparison_rows(uid_field):
    rs = RuleSet()
    rs.apply([rules.parse_line("-a always,exit -F dir=/srv -F uid=0 -k root"),
              rules.parse_line("-w /srv -k all")])
    assert rs.select(event(0)).keys == ["all", "root"]
    assert rs.select(event(1)).keys == ["all"]


# -- the identity index ------------------------------------------------------------

def test_duplicates_refused_and_delete_finds_the_rule():
    rs = RuleSet()
    rs.apply([rules.parse_line("-a always,exit -F dir=/srv -S fs-create -k a"),
              rules.parse_line("-w /etc/passwd -p wa")])
    rid = rs.find(parse_rule("-a always,exit -F arch=b64 -F dir=/srv/ -S fs-create -F key=a"))
    assert rid == 1
    with pytest.raises(RuleError, match="duplicate rule"):
        rs.add(parse_rule("-a always,exit -F dir=/srv -S fs-create -k a"))
    assert rs.remove(parse_rule("-W /etc/passwd -p wa")) == 2
    assert rs.find(parse_rule("-w /etc/passwd -p wa")) is None
    assert rs.add(parse_rule("-w /etc/passwd -p wa")) == 3     # ids are not reused
    rs.apply([rules.parse_line("-D")])
    assert rs.find(parse_rule("-a always,exit -F dir=/srv -S fs-create -k a")) is None


def test_index_follows_direct_writes_to_rules():
    rs = RuleSet()
    a, b = parse_rule("-w /a"), parse_rule("-w /b")
    rs.add(a)
    before = dict(rs.rules)
    rs.add(b)
    rs.rules = before                  # a plain dict, as the auditor's rollback assigns
    assert isinstance(rs.rules, RuleTable)
    assert rs.find(b) is None and rs.find(a) == 1
    rs.rules[7] = b
    assert rs.find(b) == 7
    rs.rules[7] = a                    # a duplicate written directly: the first one wins
    assert rs.find(a) == 1 and rs.find(b) is None
    del rs.rules[1]
    assert rs.find(a) == 7
    assert rs.rules.pop(7) == a and rs.find(a) is None
    rs.rules.update({2: b})
    assert rs.find(b) == 2
    copy = rs.copy()
    copy.remove(b)
    assert rs.find(b) == 2 and copy.find(b) is None
    assert rs == RuleSet({2: b}, rs.next_id)


def test_loading_is_linear_in_identity_calls(monkeypatch):
    calls = 0
    identity = Rule.identity

    def counting(self):
        nonlocal calls
        calls += 1
        return identity(self)

    monkeypatch.setattr(Rule, "identity", counting)
    n = 10_000
    rs = RuleSet()
    rs.apply(rules.parse_lines(f"-w /srv/d{i} -k k" for i in range(n)))
    assert len(rs) == n
    assert calls <= 2 * n
    calls = 0
    assert rs.find(parse_rule("-w /srv/d9999 -k k")) == n
    assert calls == 1
