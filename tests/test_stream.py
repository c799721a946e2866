"""The record stream without the kernel: the auditor, the processor chain, the one
match and the encoders, fed by a backend that replays records (fast, no root)."""
import json

import msgpack

from fswatchaudit.auditor import Auditor
from fswatchaudit.backends.base import Backend
from fswatchaudit.enrich import default_pipeline
from fswatchaudit.events import (
    Event,
    LostCounts,
    Marker,
    ProcessState,
    RulesInForce,
    record_from_dict,
)
from fswatchaudit.rules import RuleSet, parse_line, watch_rule
from fswatchaudit.sinks import HumanEncoder, JsonEncoder, ListSink, MsgpackEncoder


class Replay(Backend):
    """A backend whose kernel is a list: what read() returns next, and lost counts."""
    name = "replay"

    @classmethod
    def probe(cls):
        return True, "always"

    def __init__(self, rules, batches=(), lost=None):
        super().__init__(rules)
        self.batches = list(batches)
        self.counts = dict(lost or {})
        self.added, self.removed, self.closed = [], [], False

    def start(self):
        pass

    def read(self, timeout):
        return self.batches.pop(0) if self.batches else []

    def add_rule(self, rid, rule):
        self.added.append(rid)

    def remove_rule(self, rid, rule):
        self.removed.append(rid)

    def lost(self):
        return dict(self.counts)

    def close(self):
        self.closed = True


def ev(op, path, **kw):
    return Event(op=op, path=path, backend="replay", pid=1, uid=0, euid=0, gid=0,
                 loginuid=0, ppid=0, comm="x", exe="/x", **kw)


def rules_of(*lines):
    rs = RuleSet()
    rs.apply([parse_line(line) for line in lines])
    return rs


def test_one_match_decides_and_attaches_keys():
    rs = rules_of("-w /srv -k srv", "-a always,exit -F dir=/srv/a -S fs-create -k a")
    assert rs.select(ev("unlink", "/etc/x")) is None
    assert rs.select(ev("create", "/srv/a/f")).keys == ["a", "srv"]
    assert rs.select(ev("unlink", "/srv/a/f")).keys == ["srv"]
    # an event of a per-process audit is kept whatever the rules say, with its key
    scoped = ev("unlink", "/etc/x", scope_keys=("pid-7",))
    assert rs.select(scoped).keys == ["pid-7"]
    # no rule at all: the backend's scope decides alone
    assert RuleSet().select(ev("unlink", "/etc/x")).keys == []


def test_kernel_matched_events_keep_their_keys_through_the_auditor():
    rs = rules_of("-w /srv -k srv", "-w /etc/passwd -p wa -k pw")
    ids = {r.key: rid for rid, r in rs.items()}
    linked = ev("chmod", "/tmp/alias", rule_ids=(ids["pw"],))   # a hard link elsewhere
    moved = ev("create", "/away/f", rule_ids=(ids["srv"],))     # the watched root moved
    unmatched = ev("create", "/srv/f", rule_ids=())             # the kernel said no rule
    sink = ListSink()
    auditor = Auditor(Replay(rs, [[linked, moved, unmatched]]), rs, [sink])
    auditor.poll_once(0)
    auditor.close()
    assert [(e.op, e.path, e.keys) for e in sink.events] == [
        ("chmod", "/tmp/alias", ["pw"]), ("create", "/away/f", ["srv"])]
    assert "rule_ids" not in sink.events[0].to_dict()


def test_stream_carries_every_record_kind_in_order():
    rs = rules_of("-w /srv -k srv")
    state = ProcessState(pid=5, reason="fork")
    backend = Replay(rs, [[ev("create", "/srv/f"), state, ev("create", "/etc/f")],
                          [ev("unlink", "/srv/f")]], lost={"ringbuf": 0})
    sink = ListSink()
    auditor = Auditor(backend, rs, [sink])
    auditor.poll_once(0)
    backend.counts["ringbuf"] = 3
    auditor.poll_once(0)
    auditor.apply([parse_line("-w /tmp -k t")])
    lost = auditor.finish()
    auditor.close()
    kinds = [r.kind for r in sink.records]
    assert kinds == ["ev", "state", "lost", "ev", "lost", "rules", "lost"]
    events = sink.events
    assert [(e.op, e.path, e.seq, e.aliases) for e in events] == [
        ("create", "/srv/f", 1, ["fs-create"]), ("unlink", "/srv/f", 2, ["fs-remove"])]
    assert sink.records[5].reason == "change" and len(sink.records[5].rules) == 2
    assert lost == {"ringbuf": 3} and sink.records[-1].counts == {"ringbuf": 3}
    assert backend.added == [2] and backend.closed
    assert "events lost: 3 (ringbuf=3)" in auditor.summary()


def test_a_failing_sink_is_counted_and_the_others_still_get_everything():
    class Broken(ListSink):
        def write(self, record):
            raise OSError("disk on fire")
    rs = rules_of("-w /srv")
    good, bad = ListSink("good"), Broken("bad")
    failures = []
    auditor = Auditor(Replay(rs, [[ev("create", "/srv/a"), ev("create", "/srv/b")]]), rs,
                      [bad, good], on_sink_error=lambda s, e, n: failures.append((s.name, n)))
    auditor.poll_once(0)
    assert len(good.events) == 2
    assert failures == [("bad", 1), ("bad", 2)]
    assert auditor.out.stats()["bad"]["write_errors"] == 2
    assert any("records not written: 2 (bad=2)" in line for line in auditor.summary())


def test_rule_change_refused_by_the_backend_changes_nothing():
    class Refusing(Replay):
        def add_rule(self, rid, rule):
            raise OSError("no more watches")
    rs = rules_of("-w /srv")
    sink = ListSink()
    auditor = Auditor(Refusing(rs), rs, [sink])
    try:
        auditor.apply([parse_line("-w /tmp")])
    except OSError:
        pass
    assert rs.texts() == ["-w /srv"] and not sink.records


def test_pipeline_passes_non_events_through_untouched():
    pipeline = default_pipeline(rules_of("-w /srv"))
    marker = Marker("stop", {"reason": "test"})
    for record in (marker, LostCounts({"x": 1}), RulesInForce(["-w /srv"], "d")):
        out = record
        for step in pipeline:
            out = step(out)
        assert out is record


def test_one_serialised_form_for_every_kind_through_every_encoder():
    records = [ev("rename", "/srv/a", path2="/srv/b", keys=["k"], seq=3),
               ProcessState(pid=9, ppid=1, comm="sh", reason="exec"),
               LostCounts({"ringbuf": 2}, time=5), RulesInForce([watch_rule("/srv").text()],
                                                                "abc", "start", time=6),
               Marker("suspend", {"reason": "log disk full"}, time=7)]
    for record in records:
        data = record.to_dict()
        assert next(iter(data)) == "t" and data["t"] == record.kind
        assert json.loads(JsonEncoder().encode(record)) == data
        assert msgpack.unpackb(MsgpackEncoder().encode(record)) == data
        assert record_from_dict(data).to_dict() == data
        line = HumanEncoder().encode(record)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert record_from_dict({"t": "hdr", "version": 1}) is None


def test_lag_is_measured_and_reported():
    import time as _time

    class Behind(Replay):
        def backlog(self):
            return {"ring_bytes": 4096, "ring_size": 1 << 20}
    rs = rules_of("-w /srv")
    old = _time.time_ns() - 3 * 10**9           # an operation done 3 s ago
    auditor = Auditor(Behind(rs, [[ev("create", "/srv/a", time=old)]]), rs, [ListSink()])
    auditor.poll_once(0)
    assert 2.5 < auditor.behind < 30 and auditor.max_behind == auditor.behind
    assert auditor.backlog == {"ring_bytes": 4096, "ring_size": 1 << 20}
    line = next(x for x in auditor.summary() if x.startswith("consumer lag"))
    assert "4096 bytes left in the ring" in line
