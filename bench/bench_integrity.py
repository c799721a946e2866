"""Cost of the hash chain and seals on the msgpack log's write path.

Writes the same events through RotatingFileSink three ways (plain, chained, chained
and sealed with an evolving key every 0.1 s, far more often than the 60 s default)
and reports, as medians over repetitions:
  write()      records/s of the event path itself (encode and queue: the chain is
               not computed there)
  end to end   records/s from the first write() to the end of close(), i.e. what the
               writer thread sustains, hashing included
  CPU          the process's CPU time per record (both threads): the figure least
               moved by other load on a shared machine
Run: .venv/bin/python bench/bench_integrity.py [--records N] [--repeat R]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fswatchaudit.events import Event  # noqa: E402
from fswatchaudit.sinks.integrity import Chain, keygen  # noqa: E402
from fswatchaudit.sinks.rotating import RotatingFileSink  # noqa: E402


def events(n: int) -> list[Event]:
    return [Event(op="create", path=f"/srv/data/project/file-{i:08d}.txt", backend="ebpf",
                  seq=i, time=1_700_000_000_000_000_000 + i, aliases=["fs-create"],
                  syscall="openat", result=0, dev=2049, ino=100000 + i, pid=4242,
                  tid=4242, ppid=1, uid=1000, euid=1000, gid=1000, loginuid=1000,
                  comm="writer", exe="/usr/bin/writer", keys=["srv"]) for i in range(n)]


def run(way: str, evs: list[Event], d: str) -> tuple[float, float, float]:
    chain = None
    if way == "chained":
        chain = Chain(None)
    elif way == "sealed":
        keygen(os.path.join(d, "seal.key"), None, force=True)
        chain = Chain(os.path.join(d, "seal.key"), seal_interval=0.1)
    path = os.path.join(d, f"audit-{way}.log")
    sink = RotatingFileSink(path, {"host": "bench"}, flush_interval=0.05, fsync="never",
                            rotate_size=64 << 20, integrity=chain)
    c0 = time.process_time()
    t0 = time.perf_counter()
    for ev in evs:
        sink.write(ev)
    t1 = time.perf_counter()
    sink.close()
    t2 = time.perf_counter()
    cpu = (time.process_time() - c0) / len(evs) * 1e6
    for name in os.listdir(d):
        if name.startswith("audit-"):
            os.unlink(os.path.join(d, name))
    return len(evs) / (t1 - t0), len(evs) / (t2 - t0), cpu


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    evs = events(args.records)
    ways = ("plain", "chained", "sealed")
    results: dict[str, list[tuple[float, float, float]]] = {w: [] for w in ways}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(args.repeat):
            for way in ways:            # interleaved, so machine noise hits all alike
                results[way].append(run(way, evs, d))
    base = statistics.median(r[2] for r in results["plain"])
    print(f"{args.records} events, {args.repeat} repetitions, medians")
    print("| way | write() records/s | end to end records/s | CPU us/record | CPU vs plain |")
    print("|---|---|---|---|---|")
    for way in ways:
        w = statistics.median(r[0] for r in results[way])
        e = statistics.median(r[1] for r in results[way])
        c = statistics.median(r[2] for r in results[way])
        print(f"| {way} | {w:,.0f} | {e:,.0f} | {c:.1f} | {c / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
