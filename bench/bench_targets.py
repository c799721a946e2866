"""Every performance target of the project, measured with the real CLI on this machine,
printed as one table: target, today's figure, met or not.

    .venv/bin/python bench/bench_targets.py [--repeat N] [--skip-ratios]

Run as root, alone (wrap it in flock /tmp/fswatchaudit-heavy.lock).  What it runs:
  start-up    `trace -r RULES` until it prints "watching": cold (an empty compiled-program
              cache, FSWATCHAUDIT_CACHE_DIR) and warm, for 1, 1,000 and 10,000 rules;
              memory (VmRSS, and the process's own memory without the ring buffer's
              mapping) when ready
  rules check `rules check` of 10,000 rules
  consumer    `trace -o LOG DIR` (eBPF) while bench/workload.c makes 200,000 events:
              events per CPU-second of the trace process (decoding, enrichment, the
              match, the msgpack log); again with --print to /dev/null
  overload    the same with two workloads at once (2 x 150,000 file operations):
              peak memory, events logged + lost counted = all of them
  fanotify    `trace --backend fanotify -o LOG DIR` under the same workload
  ratios      the workload's CPU time (and wall time) with the eBPF backend unwatched
              and watched against no tracing: bench_ebpf.py's interleaved runs, the
              workload pinned to one CPU, medians of the paired ratios
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import bench_ebpf  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROUNDS = 50_000                 # 4 auditable events per round
EVENTS_PER_ROUND = bench_ebpf.EVENTS_PER_ROUND


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fswatchaudit", *args]


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_mem(pid: int) -> dict[str, int]:
    """VmRSS in KiB, "ring": the resident part of the BPF maps mapped into the process
    (the ring buffer: kernel memory, mapped twice so that records can wrap), and "own":
    the rest."""
    out = {"ring": 0}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            if name == "VmRSS":
                out[name] = int(value.split()[0])
    with open(f"/proc/{pid}/smaps") as fh:
        in_map = False
        for line in fh:
            if not line[0].isupper() or line.startswith(("0", "1", "2", "3", "4", "5", "6",
                                                          "7", "8", "9")):
                in_map = "bpf-map" in line or "[bpf" in line
            elif in_map and line.startswith("Rss:"):
                out["ring"] += int(line.split()[1])
    out["own"] = out["VmRSS"] - out["ring"]
    return out


class Trace:
    """`fswatchaudit trace ARGS` until SIGINT; ready once it says "watching"."""

    def __init__(self, args: list[str], env: dict | None = None,
                 stdout=subprocess.DEVNULL) -> None:
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cli("trace", *args), stdout=stdout,
                                     stderr=subprocess.PIPE, text=True, cwd=REPO,
                                     env=env)
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise SystemExit("trace exited before watching:\n" + "".join(self.lines))
            self.lines.append(line)
            if line.startswith("watching "):
                break
        self.ready_after = time.perf_counter() - t0
        self.mem_ready = proc_mem(self.proc.pid)
        self.cpu_ready = proc_cpu(self.proc.pid)
        self.peak = dict(self.mem_ready)
        self._sampling = False

    def sample(self, interval: float = 0.02) -> None:
        """Keep the peak of every memory figure until stop()."""
        self._sampling = True

        def run() -> None:
            while self._sampling:
                try:
                    for k, v in proc_mem(self.proc.pid).items():
                        self.peak[k] = max(self.peak.get(k, 0), v)
                except OSError:
                    return
                time.sleep(interval)
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid) - self.cpu_ready

    def stop(self) -> dict:
        cpu = self.cpu()
        self._sampling = False
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=600)
        text = "".join(self.lines) + err
        events = int(re.search(r"^events: (\d+)", text, re.M).group(1))
        lost = int(re.search(r"^events lost: (\d+)", text, re.M).group(1))
        return {"events": events, "lost": lost, "cpu": cpu, "stderr": text}


def wait_drained(t: Trace, quiet: float = 0.5) -> None:
    """Until the trace has used no CPU for a moment (the ring is drained)."""
    last = t.cpu()
    while True:
        time.sleep(quiet)
        now = t.cpu()
        if now - last < 0.01:
            return
        last = now


# ---- measures ---------------------------------------------------------------------------
def rules_file(base: str, n: int) -> str:
    path = os.path.join(base, f"rules{n}")
    with open(path, "w") as fh:
        for i in range(n):
            d = os.path.join(base, "dirs", f"d{i}")
            os.makedirs(d, exist_ok=True)
            fh.write(f"-a always,exit -F dir={d} -F perm=wa -k k{i}\n")
    return path


def startup(base: str, repeat: int) -> dict:
    out: dict = {}
    for n in (1, 1000, 10_000):
        rules = rules_file(base, n)
        cache = tempfile.mkdtemp(prefix="cache-", dir=base)
        env = dict(os.environ, FSWATCHAUDIT_CACHE_DIR=cache)
        cold = Trace(["--backend", "ebpf", "-r", rules], env=env)
        cold.stop()
        warm = []
        for _ in range(repeat):
            t = Trace(["--backend", "ebpf", "-r", rules], env=env)
            warm.append(t)
            t.stop()
        out[n] = {"cold": cold.ready_after,
                  "warm": statistics.median(t.ready_after for t in warm),
                  "mem": warm[-1].mem_ready}
    small = []
    for _ in range(2):              # the first of another ring size compiles
        t = Trace(["--backend", "ebpf", "--ring-buffer", "8M", "-r", rules_file(base, 1)],
                  env=env)
        small.append(t.mem_ready)
        t.stop()
    out["ring8m_mem"] = small[-1]
    fan = Trace(["--backend", "fanotify", "-r", rules_file(base, 1)])
    out["fanotify_mem"] = fan.mem_ready
    fan.stop()
    return out


def rules_check(base: str) -> float:
    rules = rules_file(base, 10_000)
    t0 = time.perf_counter()
    subprocess.run(cli("rules", "check", rules), stdout=subprocess.DEVNULL, check=True,
                   cwd=REPO)
    return time.perf_counter() - t0


def consume(exe: str, base: str, backend: str, writers: int, rounds: int,
            extra: tuple[str, ...] = ()) -> dict:
    work = tempfile.mkdtemp(prefix="w-", dir=base)
    dirs = []
    for i in range(writers):
        dirs.append(os.path.join(work, f"w{i}"))
        os.mkdir(dirs[-1])
    log = os.path.join(base, f"log-{backend}-{writers}-{len(extra)}")
    t = Trace(["--backend", backend, "-o", log, *extra, work])
    t.sample()
    loads = [bench_ebpf.Workload(exe, d, rounds) for d in dirs]
    for w in loads:
        w.finish()
    wait_drained(t)
    res = t.stop()
    res["peak"] = t.peak
    res["expected"] = writers * rounds * EVENTS_PER_ROUND
    shutil.rmtree(work, ignore_errors=True)
    try:
        os.unlink(log)
    except OSError:
        pass
    return res


RATIO_ROUNDS = 10_000


def ratios(exe: str, base: str, repeat: int) -> dict:
    """bench_ebpf's interleaved runs (workload pinned to one CPU, order rotated); the
    paired workload-CPU ratio decides, the wall-time one is shown beside it."""
    workdir, elsewhere = os.path.join(base, "rw"), os.path.join(base, "re")
    os.mkdir(workdir)
    os.mkdir(elsewhere)
    ways = {"baseline": lambda: bench_ebpf.Workload(exe, workdir, RATIO_ROUNDS).finish(),
            "unwatched": lambda: bench_ebpf.run_ebpf(exe, workdir, elsewhere, RATIO_ROUNDS,
                                                     False),
            "watched": lambda: bench_ebpf.run_ebpf(exe, workdir, workdir, RATIO_ROUNDS,
                                                   True)}
    runs: dict[str, list] = {way: [] for way in ways}
    order = list(ways)
    for rep in range(repeat):
        k = rep % len(order)
        for way in order[k:] + order[:k]:
            runs[way].append(dict(ways[way](), rep=rep))
    out: dict = {way: {"cpu": bench_ebpf.cost(runs, way),
                       "wall": bench_ebpf.cost(runs, way, "ns")}
                 for way in ("unwatched", "watched")}
    out["watched_ok"] = all(r["exactly_once"] and not r["lost"] for r in runs["watched"])
    return out


def ratio_text(r: dict) -> str:
    return (f"{r['cpu']['median']:.2f}x workload CPU [quartiles {r['cpu']['p25']:.2f}-"
            f"{r['cpu']['p75']:.2f}], wall {r['wall']['median']:.2f}x")


# ---- the table ----------------------------------------------------------------------------
def mb(kib: int) -> str:
    return f"{kib / 1024:.0f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ratio-repeat", type=int, default=15,
                    help="interleaved repetitions of the cost ratios (10,000 rounds each)")
    ap.add_argument("--skip-ratios", action="store_true",
                    help="leave out the unwatched/watched workload ratios (slow)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    base = tempfile.mkdtemp(prefix="fswa-targets-", dir="/tmp")
    rows: list[tuple[str, str, str, bool | None]] = []

    def row(measure: str, target: str, today: str, met: bool | None) -> None:
        rows.append((measure, target, today, met))
        print(f"  {measure}: {today}", file=sys.stderr, flush=True)
    try:
        exe = bench_ebpf.build_workload(base)
        st = startup(base, args.repeat)
        for n in (1, 1000):
            row(f"start-up to watching, {n:,} rules, warm", "<= 0.5 s",
                f"{st[n]['warm']:.2f} s", st[n]["warm"] <= 0.5)
        row("start-up, 10,000 rules, warm", "<= 2 s", f"{st[10_000]['warm']:.2f} s",
            st[10_000]["warm"] <= 2)
        row("start-up, first (cold: compile), 1 rule", "<= 2 s", f"{st[1]['cold']:.2f} s",
            st[1]["cold"] <= 2)
        mem = st[1]["mem"]
        row("memory when ready (eBPF, 1 rule)", "<= 60 MB",
            f"VmRSS {mb(mem['VmRSS'])}: the ring buffer's mapping {mb(mem['ring'])}, the "
            f"process's own {mb(mem['own'])} (fanotify: VmRSS "
            f"{mb(st['fanotify_mem']['VmRSS'])})", mem["VmRSS"] <= 60 * 1024)
        small = st["ring8m_mem"]
        row("memory when ready, --ring-buffer 8M", "<= 60 MB",
            f"VmRSS {mb(small['VmRSS'])} (ring mapping {mb(small['ring'])})",
            small["VmRSS"] <= 60 * 1024)
        rc = rules_check(base)
        row("rules check, 10,000 rules", "< 1 s, linear", f"{rc:.2f} s", rc < 1)

        c = consume(exe, base, "ebpf", 1, ROUNDS)
        rate = c["events"] / c["cpu"]
        row("consumer (eBPF, trace -o, msgpack log)", ">= 250k events/CPU-s",
            f"{rate / 1000:.0f}k events/CPU-s ({c['events']:,} events, {c['lost']} lost)",
            rate >= 250_000)
        p = consume(exe, base, "ebpf", 1, ROUNDS, ("--print",))
        prate = p["events"] / p["cpu"]
        row("consumer with --print to /dev/null", "cheap when asked",
            f"{prate / 1000:.0f}k events/CPU-s ({rate / prate:.2f}x the cost of "
            "printing nothing)", None)
        o = consume(exe, base, "ebpf", 2, 25_000)      # 6 operations a round
        counted = o["events"] + o["lost"]
        pk = o["peak"]
        row("overload: 2 writers x 150k ops", "RSS <= 100 MB, loss counted",
            f"peak VmRSS {mb(pk['VmRSS'])} (ring mapping {mb(pk['ring'])}, own "
            f"{mb(pk['own'])}); {o['events']:,} logged + {o['lost']:,} counted lost = "
            f"{counted:,} of {o['expected']:,}",
            pk["VmRSS"] <= 100 * 1024 and counted >= o["expected"])
        f = consume(exe, base, "fanotify", 1, 20_000)
        frate = f["events"] / f["cpu"]
        row("fanotify consumer", "facts cached per process",
            f"{frate / 1000:.0f}k events/CPU-s ({f['events']:,} events)", None)
        if not args.skip_ratios:
            r = ratios(exe, base, args.ratio_repeat)
            row("unwatched cost (eBPF)", "<= 1.03x", ratio_text(r["unwatched"]),
                r["unwatched"]["cpu"]["median"] <= 1.03)
            row("watched cost (eBPF)", "<= 1.15x",
                ratio_text(r["watched"]) + ("" if r["watched_ok"] else " (events missing!)"),
                r["watched"]["cpu"]["median"] <= 1.15 and r["watched_ok"])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nkernel {os.uname().release}, {os.cpu_count()} CPUs, "
          f"median of {args.repeat} where repeated\n")
    print("| measure | target | today | met |")
    print("|---|---|---|---|")
    for measure, target, today, met in rows:
        verdict = "-" if met is None else ("yes" if met else "**no**")
        print(f"| {measure} | {target} | {today} | {verdict} |")


if __name__ == "__main__":
    main()
