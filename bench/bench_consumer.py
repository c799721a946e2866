"""The consumer's cost per event, without the kernel: records replayed into the real
Auditor (the one match, the processor chain, the fan-out) and the real msgpack log sink,
against the decoding of the same events alone as the baseline in the same run.

    .venv/bin/python bench/bench_consumer.py [--events N] [--rules N]

Prints events per CPU-second of the consumer for the whole chain, and for each stage.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from fswatchaudit.auditor import Auditor  # noqa: E402
from fswatchaudit.backends.base import Backend  # noqa: E402
from fswatchaudit.events import Event  # noqa: E402
from fswatchaudit.rules import RuleSet, parse_line  # noqa: E402
from fswatchaudit.sinks import RotatingFileSink  # noqa: E402

BATCH = 512


class Replay(Backend):
    name = "replay"

    @classmethod
    def probe(cls):
        return True, "bench"

    def __init__(self, rules, batches):
        super().__init__(rules)
        self.batches = batches
        self.on_empty = lambda: None

    def start(self):
        pass

    def read(self, timeout):
        if not self.batches:
            self.on_empty()
            return []
        return self.batches.pop()


def make_events(n: int, watched: str) -> list[list[Event]]:
    pid = os.getpid()
    t = time.time_ns()
    events = [Event(op="create", path=f"{watched}/d{i % 50}/f{i}", backend="ebpf",
                    time=t + i, syscall="openat", result=0, dev=2049, ino=1000 + i,
                    pid=pid, tid=pid, ppid=os.getppid(), uid=0, euid=0, gid=0,
                    loginuid=4294967295, comm="python3", exe=sys.executable)
              for i in range(n)]
    return [events[i:i + BATCH] for i in range(0, n, BATCH)][::-1]


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(n: int, rules: int, with_log: bool) -> float:
    rs = RuleSet()
    rs.apply([parse_line(f"-a always,exit -F dir=/srv/r{i} -k r{i}") for i in range(rules - 1)] +
             [parse_line("-a always,exit -F dir=/srv/watched -k w")])
    batches = make_events(n, "/srv/watched")
    with tempfile.TemporaryDirectory() as d:
        sinks = [RotatingFileSink(os.path.join(d, "a.log"), {"b": 1}, flush_interval=3600)] \
            if with_log else []
        auditor = Auditor(Replay(rs, batches), rs, sinks)  # type: ignore[arg-type]
        start = cpu()
        while batches:
            auditor.poll_once(0)
        auditor.out.close()
        spent = cpu() - start
    assert auditor.events == n
    return n / spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--rules", type=int, nargs="+", default=[1, 1000])
    args = ap.parse_args()
    print("| rules | chain only (events/CPU-s) | chain + msgpack log (events/CPU-s) |")
    print("|---|---|---|")
    for rules in args.rules:
        chain = run(args.events, rules, False)
        full = run(args.events, rules, True)
        print(f"| {rules} | {chain:,.0f} | {full:,.0f} |")


if __name__ == "__main__":
    main()
