"""The CPU each sink costs this process per 100,000 records, without the kernel: the
eBPF bench's events (create, chmod, rename, unlink with a key) handed in batches, as
the consumer hands them, to one sink at a time and then to every sink at once, each
remote one with its real receiver on this host (rsyslog over TCP, a namespaced
systemd-journald, nats-server -js), until the sink has handed everything on and is
closed.  The baseline in the same run is the fan-out into an in-memory list.

    .venv/bin/python bench/bench_sinks.py [--records N] [--repeat N] [--only KIND,...]

Reported per sink: CPU-s of the whole process per 100k records (median of the runs),
the part spent in the consumer's own calls (``write_many`` / ``flush``, the event
path), the wall time until closed, and sent / lost as the sink and its receiver count
them.  With --profile DIR, py-spy (when installed) records each run's threads there.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from fswatchaudit.events import Event  # noqa: E402
from fswatchaudit.sinks import kinds  # noqa: E402
from fswatchaudit.sinks.base import Fanout  # noqa: E402
from fswatchaudit.sinks.integrity import Chain  # noqa: E402
from fswatchaudit.sinks.memory import ListSink  # noqa: E402
from fswatchaudit.sinks.rotating import RotatingFileSink  # noqa: E402
from tests.receivers import Journald, NatsServer, Rsyslog  # noqa: E402

sys.path.insert(0, HERE)
from bench_ebpf import nats_records  # noqa: E402

BATCH = 256                  # records per consumer batch (a ring buffer read)
QUEUE = 2_000_000
KINDS = ("log", "jsonl", "auditd", "syslog", "journald", "nats")


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def sys_cpu() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def make_events(n: int, workdir: str) -> list[Event]:
    pid, t = 4242, time.time_ns()
    out: list[Event] = []
    for i in range(n):
        op = ("create", "chmod", "rename", "unlink")[i % 4]
        f, g = f"{workdir}/f{i // 4}", f"{workdir}/g{i // 4}"
        out.append(Event(
            op=op, path=g if op == "unlink" else f, path2=g if op == "rename" else None,
            backend="ebpf", time=t + i * 1000, seq=i + 1,
            aliases=["fs-create"] if op == "create" else ["fs-attr"] if op == "chmod"
            else ["fs-create", "fs-remove"] if op == "rename" else ["fs-remove"],
            syscall={"create": "openat", "chmod": "chmod", "rename": "rename",
                     "unlink": "unlink"}[op], result=0, dev=2049, ino=100000 + i // 4,
            pid=pid, tid=pid, ppid=1, uid=0, euid=0, gid=0, loginuid=4294967295,
            comm="workload", exe="/tmp/fswa-bench/workload", keys=["bench"]))
    return out


class Receivers:
    def __init__(self, tmp: str) -> None:
        os.makedirs(os.path.join(tmp, "rsyslog"))
        self.rsyslog = Rsyslog(os.path.join(tmp, "rsyslog"))
        self.journald = Journald(f"fswasinks{os.getpid()}", rate_limit=False)
        self.nats = NatsServer(os.path.join(tmp, "js"))
        self.nats.start()

    def cpu(self) -> dict[str, float]:
        """CPU-s each receiver process has used so far."""
        out = {}
        for kind, proc in (("syslog", self.rsyslog.proc), ("journald", self.journald.proc),
                           ("nats", self.nats.proc)):
            try:
                with open(f"/proc/{proc.pid}/stat") as fh:      # type: ignore[union-attr]
                    fields = fh.read().rsplit(")", 1)[1].split()
                out[kind] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, AttributeError):
                out[kind] = 0.0
        return out

    def count(self, kind: str) -> int:
        if kind == "syslog":
            if not os.path.exists(self.rsyslog.out):
                return 0
            with open(self.rsyslog.out, "rb") as fh:
                return sum(1 for _ in fh)
        if kind == "journald":
            r = subprocess.run(["journalctl", f"--namespace={self.journald.namespace}",
                                "--no-pager", "-o", "cat", "SYSLOG_IDENTIFIER=fswatchaudit"],
                               capture_output=True)
            return r.stdout.count(b"\n")
        if kind == "nats":
            return nats_records(self.nats.url)
        return 0

    def close(self) -> None:
        self.nats.stop()
        self.journald.stop()
        self.rsyslog.stop()


def build(kind: str, out: str, rec: Receivers, header: dict) -> object:
    if kind == "log":
        return RotatingFileSink(os.path.join(out, "audit.log"), header, integrity=Chain())
    given = {"jsonl": {"path": f"{out}/audit.jsonl"},
             "auditd": {"path": f"{out}/audit.auditd"},
             "syslog": {"address": f"tcp://127.0.0.1:{rec.rsyslog.tcp}", "queue": str(QUEUE)},
             "journald": {"socket": rec.journald.socket, "queue": str(QUEUE)},
             "nats": {"servers": rec.nats.url, "spool_dir": f"{out}/spool",
                      "queue": str(QUEUE)}}[kind]
    return kinds.build(kinds.settings_for(kind, given, kind), kinds.SinkContext(header),
                       frozenset({"syscall", "result", "uid", "loginuid"}))


def run(which: tuple[str, ...], events: list[Event], rec: Receivers | None, tmp: str,
        n: int, profile: str | None) -> dict:
    out = tempfile.mkdtemp(dir=tmp)
    header = {"host": "bench", "boot_id": "b", "start": time.time_ns(), "backend": "ebpf"}
    before = {k: rec.count(k) for k in which if k in ("syslog", "journald", "nats")} \
        if rec else {}
    sinks = [build(k, out, rec, header) for k in which] if which else [ListSink()]
    log = next((s for s in sinks if isinstance(s, RotatingFileSink)
                and s.integrity is not None), None)
    if log is not None:
        log.heads_to = [s for s in sinks if not isinstance(s, RotatingFileSink)]
    fan = Fanout(sinks)                           # type: ignore[arg-type]
    spy = None
    if profile:
        name = "+".join(which) or "baseline"
        exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        spy = subprocess.Popen([exe, "record", "--threads",
                                "-r", "200", "-f", "raw", "-o",
                                os.path.join(profile, f"{name}.txt"), "-p", str(os.getpid())],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
    r0 = rec.cpu() if rec else {}
    c0, s0, w0 = cpu(), sys_cpu(), time.monotonic()
    path_cpu = 0.0
    for i in range(0, n, BATCH):
        t0 = time.thread_time()
        fan.write_many(events[i:i + BATCH])
        fan.flush()
        path_cpu += time.thread_time() - t0
    fed = time.monotonic() - w0
    fan.close()
    c1, s1, w1 = cpu(), sys_cpu(), time.monotonic()
    if spy is not None:
        spy.send_signal(2)
        spy.wait(30)
    stats = fan.stats()
    sent = {name: st.get("sent", st.get("records_written")) for name, st in stats.items()}
    lost = {name: st.get("lost", st.get("records_dropped")) for name, st in stats.items()}
    got = {}
    for k in before:
        deadline = time.monotonic() + 20
        while True:
            got[k] = rec.count(k) - before[k] if rec else 0
            if got[k] >= (sent.get(k) or 0) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    r1 = rec.cpu() if rec else {}
    shutil.rmtree(out, ignore_errors=True)
    return {"receivers": sum(r1[k] - r0[k] for k in r0 if k in which),
            "cpu": c1 - c0, "sys": s1 - s0, "path_cpu": path_cpu, "wall": w1 - w0, "fed": fed,
            "sent": sent, "lost": lost, "received": got, "errors": dict(fan.errors)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", help="comma-separated sink kinds (default: each, then all)")
    ap.add_argument("--no-all", action="store_true", help="skip the run with every sink")
    ap.add_argument("--profile", metavar="DIR", help="py-spy raw profiles into DIR")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the receivers (journald) need it")
    which = tuple(args.only.split(",")) if args.only else KINDS
    bad = [k for k in which if k not in KINDS]
    if bad:
        raise SystemExit(f"bench_sinks: unknown sink kind {', '.join(bad)}: "
                         f"choose from {', '.join(KINDS)}")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="fswa-bench-sinks-", dir="/tmp")
    events = make_events(args.records, "/tmp/fswa-bench/work")
    ways: list[tuple[str, ...]] = [()] + [(k,) for k in which]
    if not args.no_all and len(which) > 1:
        ways.append(which)
    results: dict[str, list[dict]] = {}
    rec = None
    try:
        rec = Receivers(tmp)
        for rep in range(args.repeat):
            for way in ways:
                rec.journald.ensure()
                name = " + ".join(way) or "baseline (list)"
                results.setdefault(name, []).append(
                    run(way, events, rec, tmp, args.records, args.profile))
            print(f"repetition {rep + 1}/{args.repeat} done", file=sys.stderr)
    finally:
        if rec is not None:
            rec.close()
        shutil.rmtree(tmp, ignore_errors=True)
    per = 100_000 / args.records
    print(f"{args.records} records, batches of {BATCH}, median of {args.repeat} runs, "
          f"{os.cpu_count()} CPUs\n")
    print("| sinks | CPU-s per 100k | of it system | of it on the event path "
          "| receivers' CPU-s per 100k | wall until closed | sent | lost | received |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        med = statistics.median
        print(f"| {name} | {med(r['cpu'] for r in runs) * per:.2f} | "
              f"{med(r['sys'] for r in runs) * per:.2f} | "
              f"{med(r['path_cpu'] for r in runs) * per:.2f} | "
              f"{med(r['receivers'] for r in runs) * per:.2f} | "
              f"{med(r['wall'] for r in runs):.2f} s | "
              f"{', '.join(str(v) for v in runs[-1]['sent'].values())} | "
              f"{', '.join(str(v) for v in runs[-1]['lost'].values())} | "
              f"{', '.join(f'{k} {v}' for k, v in runs[-1]['received'].items()) or '-'} |")


if __name__ == "__main__":
    main()
