"""Search benchmark: records per second scanned and matched on a log of 5 million
events (rotated files written by the real log writer), and a time-range query that
skips whole files.

    .venv/bin/python bench/bench_search.py [--events N] [--dir /tmp/fswa-bench-search]

The log is generated once into --dir (kept for the next run; not in the repository)
and each query runs through the real command line, output to /dev/null.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import time

import msgpack

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from fswatchaudit.sinks import RotatingFileSink  # noqa: E402

SPAN_S = 5 * 86400                # the events cover five days, ending now


class Prepacked:
    """Encoder for records already packed (the generator packs its own maps)."""

    def __init__(self) -> None:
        self.packer = msgpack.Packer()

    def encode(self, record):
        return record

    def encode_map(self, data):
        return self.packer.pack(data)


def generate(path: str, n: int) -> None:
    header = {"host": "bench", "boot_id": "b", "start": time.time_ns(), "backend": "ebpf",
              "rules_digest": "d", "rules": ["-w /etc -p wa -k etc", "-w /srv -k srv"]}
    w = RotatingFileSink(path, header, rotate_size="64M", rotate_count=100,
                         fsync="never", encoder=Prepacked())  # type: ignore[arg-type]
    pack = msgpack.Packer().pack
    ops = [("create", ["fs-create"], "openat"), ("unlink", ["fs-remove"], "unlinkat"),
           ("chmod", ["fs-attr"], "fchmodat"), ("open", ["open"], "openat"),
           ("rename", ["fs-create", "fs-remove"], "renameat2")]
    exes = ["/usr/bin/vim", "/usr/bin/dpkg", "/usr/bin/python3", "/usr/sbin/sshd",
            "/usr/bin/rsync", "/usr/bin/bash"]
    end = time.time_ns()
    start = end - SPAN_S * 10**9
    step = SPAN_S * 10**9 // n
    t0 = time.monotonic()
    for i in range(n):
        op, aliases, sc = ops[i % 5]
        key = "etc" if i % 3 else "srv"
        d = {"t": "ev", "seq": i, "time": start + i * step, "aliases": aliases, "op": op,
             "syscall": sc, "result": -13 if i % 1000 == 7 else 0,
             "path": f"/{key}/dir{i % 97}/file{i % 1013}", "dev": 65024, "ino": 1000 + i,
             "pid": 1000 + i % 300, "tid": 1000 + i % 300, "ppid": 1, "uid": i % 3 * 500,
             "euid": 0, "gid": 0, "loginuid": 1000 if i % 4 else 4294967295,
             "comm": "x", "exe": exes[i % 6], "keys": [key], "backend": "ebpf"}
        if op == "rename":
            d["path2"] = d["path"] + ".new"
        w.write(pack(d))  # type: ignore[arg-type]
        if i % 1_000_000 == 0 and i:
            print(f"  {i:,} events written ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    w.close()
    print(f"generated {n:,} events in {time.monotonic() - t0:.0f} s", file=sys.stderr)


def run(path: str, *args: str) -> dict:
    cmd = [sys.executable, "-m", "fswatchaudit", "search", "--all", *args, path]
    t0 = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.monotonic() - t0
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    m = re.search(r"(\d+) matched; (\d+) records scanned in (\d+) files \((\d+) skipped "
                  r"by time range\) in ([\d.]+) s", r.stderr)
    assert m, r.stderr
    matched, records, files, skipped = (int(m.group(i)) for i in range(1, 5))
    return {"args": " ".join(args), "matched": matched, "records": records, "files": files,
            "skipped": skipped, "scan_s": float(m.group(5)), "wall_s": wall, "cpu_s": cpu}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=5_000_000)
    ap.add_argument("--dir", default="/tmp/fswa-bench-search")
    ap.add_argument("--regenerate", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    path = os.path.join(args.dir, "audit.log")
    stamp = os.path.join(args.dir, f"done-{args.events}")
    if args.regenerate or not os.path.exists(stamp):
        for f in os.listdir(args.dir):
            os.unlink(os.path.join(args.dir, f))
        generate(path, args.events)
        open(stamp, "w").close()
    files = [f for f in os.listdir(args.dir) if f.startswith("audit.log")]
    size = sum(os.path.getsize(os.path.join(args.dir, f)) for f in files)
    print(f"log: {args.events:,} events, {len(files)} files, {size / 2**20:.0f} MiB; "
          f"{os.cpu_count()} CPUs")
    # the time-range query picks the last 2 hours of a five-day log
    queries = [
        ("no match (every record read and tested)", ["-k", "nosuchkey"]),
        ("failures (-r EACCES)", ["--json", "-r", "EACCES"]),
        ("path prefix + alias", ["--json", "--under", "/srv/dir5", "-S", "fs-remove"]),
        ("everything matches, JSON out", ["--json"]),
        ("time range: last 2 hours (skips files)", ["--json", "--since", "-2h"]),
        ("time range + key", ["--json", "--since", "-2h", "-k", "srv"]),
    ]
    print("| query | matched | records read | files read / skipped | CPU time | "
          "records read per CPU-s | matched per CPU-s | log records per CPU-s | wall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for title, q in queries:
        r = run(path, *q)
        cpu = r["cpu_s"]
        share = 100 * r["matched"] / args.events
        print(f"| {title} | {r['matched']:,} ({share:.2g} %) | {r['records']:,} | {r['files']} / "
              f"{r['skipped']} | {cpu:.2f} s | {r['records'] / cpu:,.0f} | "
              f"{r['matched'] / cpu:,.0f} | {args.events / cpu:,.0f} | "
              f"{r['wall_s']:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
