"""Cost of the eBPF backend on a file-operation workload, against no tracing and auditd.

One workload (bench/workload.c, compiled with gcc here) does ROUNDS rounds of
open(O_CREAT) + write + close, chmod, rename, unlink, each run on a fresh ext4
filesystem (FreshFilesystem; --same-fs: one directory of /tmp).  It runs several ways,
interleaved over a few repetitions so that drifts of the machine hit every way alike:

  baseline    nothing traces
  unwatched   the eBPF backend runs, watching a sibling directory on the same filesystem
  watched     the eBPF backend watches the workload's own directory, a consumer reads
  watched, log + jsonl + auditd files
              as watched, through the whole auditor into the chained msgpack log and
              the jsonl and auditd file sinks
  watched, all sinks
              as watched, through the whole auditor (processor chain, fan-out) into
              every sink at once: the msgpack log with its hash chain (heads sent to
              the remote sinks), jsonl, auditd text, syslog to a real rsyslog (TCP),
              journald to a real namespaced systemd-journald and NATS to a real
              nats-server -js (receivers started as the tests start them)
  auditd      `auditctl -w DIR -p wa` (only where auditctl is installed)

The workload runs pinned to one CPU (the last one, --cpu), the ways of a repetition in
an order rotated at every repetition, and many short repetitions rather than a few long
ones: on a shared machine a burst of other work then spoils a few runs of every way
alike instead of one way's whole figure.  Reported per way: the workload's wall time
and its CPU time (user + system: the BPF programs run inside its syscalls, so they are
charged to it, while time it spends waiting for a CPU other jobs hold is not), each as
the median over the runs and as the median of the paired ratios (each run against the
baseline run of the same repetition) with their quartiles and range; every run counts,
none is dropped.  The verdict on a cost target uses the paired CPU-time ratio: it
measures what the programs add to the audited work and is the least moved by other jobs
on the machine (the wall-time figures are printed beside it).  Also: events
delivered, events lost, whether every expected event came exactly once, and the CPU
time the consumer spent (with all sinks: every thread of the process, sinks
included, until they have handed everything on); for the sinks, what each sent, lost
and still held at the end, and what the receivers stored.  Also the start-up time of
the backend with 10 rules, measured in a fresh process.
Run as root:  .venv/bin/python bench/bench_ebpf.py

With --rules FILE (for instance bench/stig-like.rules) one more way runs, unwatched
with that rules file loaded besides its watch, the watched way loads it too, and the
start-up is measured with it: the cost of a realistic rule set, path-less syscall
rules included, on a workload it does not select (the workload runs with the bench's
own login uid, printed with the results).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from fswatchaudit.rules import RuleSet, load, watch_rule  # noqa: E402
from tests.linux_audit import Auditd, audit_status  # noqa: E402
from tests.receivers import Journald, NatsServer, Rsyslog  # noqa: E402

AUDIT_KEY = "fswa-bench"
OPS_PER_ROUND = 6            # open, write, close, chmod, rename, unlink
EVENTS_PER_ROUND = 4         # create, chmod, rename, unlink


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def build_workload(outdir: str) -> str:
    exe = os.path.join(outdir, "workload")
    subprocess.run(["gcc", "-O2", "-o", exe, os.path.join(HERE, "workload.c")], check=True)
    return exe


TRACING_PROG_TYPES = ("tracepoint", "raw_tracepoint", "tracing", "kprobe", "perf_event",
                      "lsm")


def tracing_programs() -> int:
    """BPF programs of tracing kinds loaded on the host right now (any owner)."""
    try:
        out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True,
                             text=True, timeout=30).stdout
        return sum(1 for p in json.loads(out or "[]") if p.get("type") in TRACING_PROG_TYPES)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return -1


def wait_quiet(limit: float) -> int:
    """Wait up to limit seconds for other tools' tracing programs to go away (they
    would slow the baseline too); returns how many are still loaded."""
    deadline = time.monotonic() + limit
    while True:
        n = tracing_programs()
        if n <= 0 or time.monotonic() >= deadline:
            return n
        time.sleep(0.5)


def default_cpu() -> int | None:
    """The CPU the workload is pinned to: the last one this process may use."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[-1] if len(cpus) > 1 else None


# the CPU every workload runs on (None: not pinned); main() sets it from --cpu
PIN_CPU: int | None = default_cpu()


class Workload:
    """One run of the workload; its own timing and its CPU time (user + system, which
    includes the BPF programs run in its syscalls).  Pinned to PIN_CPU, so that its
    caches and the scheduler treat every way alike."""

    def __init__(self, exe: str, workdir: str, rounds: int) -> None:
        cpu = PIN_CPU
        self.proc = subprocess.Popen(
            [exe, str(rounds)], cwd=workdir, stdout=subprocess.PIPE, text=True,
            preexec_fn=None if cpu is None else lambda: os.sched_setaffinity(0, {cpu}))

    def poll(self) -> int | None:
        return self.proc.poll()

    def finish(self) -> dict:
        out = self.proc.stdout.read()
        _, status, ru = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        if self.proc.returncode != 0:
            raise SystemExit(f"workload failed with status {self.proc.returncode}")
        return {"ns": int(out), "workload_cpu": ru.ru_utime + ru.ru_stime}


def expected_events(workdir: str, rounds: int) -> set[tuple]:
    out = set()
    for i in range(rounds):
        f, g = f"{workdir}/f{i}", f"{workdir}/g{i}"
        out |= {("create", f, None), ("chmod", f, None), ("rename", f, g), ("unlink", g, None)}
    return out


def run_ebpf(exe: str, workdir: str, watch: str, rounds: int, check: bool,
             rules_file: str | None = None) -> dict:
    from fswatchaudit.backends.ebpf import EbpfBackend
    rs = load([rules_file]) if rules_file else RuleSet()
    rs.add(watch_rule(watch))
    be = EbpfBackend(rs)
    be.start()
    try:
        seen: collections.Counter = collections.Counter()
        others = 0                  # events of other processes (a rules file's watches)
        cpu0 = cpu_seconds()
        work = Workload(exe, workdir, rounds)

        def count(got: list) -> None:
            nonlocal others
            for ev in got:
                if getattr(ev, "pid", None) == work.proc.pid:
                    seen[(ev.op, ev.path, ev.path2)] += 1
                else:
                    others += 1
        while not os.waitid(os.P_PID, work.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
            count(be.read(0.05))
        timing = work.finish()
        while True:                       # what is still in the ring buffer
            got = be.read(0.2)
            if not got:
                break
            count(got)
        cpu = cpu_seconds() - cpu0
        lost = sum(be.lost().values())
    finally:
        be.close()
    res = dict(timing, events=sum(seen.values()), others=others, lost=lost,
               consumer_cpu=cpu)
    if check:
        want = expected_events(workdir, rounds)
        got = set(seen)
        res["missing"] = len(want - got)
        res["unexpected"] = sum(seen[k] for k in got - want)
        res["duplicates"] = sum(n - 1 for n in seen.values() if n > 1)
        res["exactly_once"] = not (res["missing"] or res["unexpected"] or res["duplicates"])
    return res


# -- the whole auditor into every sink ---------------------------------------------------

SINK_QUEUE = 2_000_000          # records a remote sink may hold: a whole run fits


class Receivers:
    """rsyslog, a namespaced journald and nats-server, for the whole bench."""

    def __init__(self, tmp: str) -> None:
        os.makedirs(os.path.join(tmp, "rsyslog"))
        self.rsyslog = Rsyslog(os.path.join(tmp, "rsyslog"))
        self.journald = Journald(f"fswabench{os.getpid()}", rate_limit=False)
        self.nats = NatsServer(os.path.join(tmp, "js"))
        self.nats.start()

    def counts(self, since: dict | None = None, expect: int = 0) -> dict:
        """Records each receiver holds now (minus ``since``); with ``expect``, waits up
        to 10 s for each to hold that many (the last ones may still be in flight)."""
        deadline = time.monotonic() + 10
        while True:
            got = self._counts(since)
            if all(v >= expect for v in got.values()) or time.monotonic() > deadline:
                return got
            time.sleep(0.5)

    def _counts(self, since: dict | None) -> dict:
        syslog = 0
        if os.path.exists(self.rsyslog.out):
            with open(self.rsyslog.out, "rb") as fh:
                syslog = sum(1 for _ in fh)
        r = subprocess.run(["journalctl", f"--namespace={self.journald.namespace}",
                            "--no-pager", "-o", "cat", "SYSLOG_IDENTIFIER=fswatchaudit"],
                           capture_output=True)
        journal = r.stdout.count(b"\n")
        nats = nats_records(self.nats.url)
        now = {"syslog": syslog, "journald": journal, "nats": nats}
        return {k: v - (since or {}).get(k, 0) for k, v in now.items()}

    def close(self) -> None:
        self.nats.stop()
        self.journald.stop()
        self.rsyslog.stop()


def nats_records(url: str) -> int:
    """Records the stream holds (a message holds one or more), duplicates included."""
    import asyncio

    import nats
    from nats.js import api

    from fswatchaudit.sinks.nats_reader import message_records

    async def count() -> int:
        nc = await nats.connect(servers=[url], allow_reconnect=False)
        try:
            js = nc.jetstream(timeout=10)
            sub = await js.pull_subscribe("fswatchaudit.>", stream="FSWATCHAUDIT",
                                          config=api.ConsumerConfig(
                                              ack_policy=api.AckPolicy.NONE,
                                              inactive_threshold=60.0))
            left = (await sub.consumer_info()).num_pending or 0
            n = 0
            while left > 0:
                for msg in await sub.fetch(min(left, 512), timeout=10):
                    n += sum(1 for _ in message_records(msg))
                    left -= 1
            await sub.unsubscribe()
            return n
        except Exception:
            return 0
        finally:
            await nc.close()
    return asyncio.run(count())


def run_all_sinks(exe: str, workdir: str, rounds: int, rec: Receivers, tmp: str,
                  rep: int, remote: bool = True) -> dict:
    """The workload watched through the whole auditor into the msgpack log (chained),
    jsonl and auditd files and, with ``remote``, syslog, journald and NATS."""
    import threading

    from fswatchaudit.auditor import Auditor
    from fswatchaudit.sinks import kinds
    from fswatchaudit.sinks.integrity import Chain
    from fswatchaudit.sinks.rotating import RotatingFileSink
    from fswatchaudit.wiring import log_header, open_backend
    rec.journald.ensure()
    # counted before the sinks exist: the log's first chain head goes out at once
    before = rec.counts() if remote else {}
    rs = RuleSet()
    rs.add(watch_rule(workdir, key="bench"))
    be = open_backend("ebpf", rs)
    out = os.path.join(tmp, f"sinks{rep}{'r' if remote else 'f'}")
    os.mkdir(out, 0o700)
    header = log_header(be.name, rs)
    log = RotatingFileSink(os.path.join(out, "audit.log"), header, integrity=Chain())
    specs = [("jsonl", {"path": f"{out}/audit.jsonl"}),
             ("auditd", {"path": f"{out}/audit.auditd"}),
             ("syslog", {"address": f"tcp://127.0.0.1:{rec.rsyslog.tcp}",
                         "queue": str(SINK_QUEUE)}),
             ("journald", {"socket": rec.journald.socket, "queue": str(SINK_QUEUE)}),
             ("nats", {"servers": rec.nats.url, "spool_dir": f"{out}/spool",
                       "queue": str(SINK_QUEUE)})][:None if remote else 2]
    from fswatchaudit.capabilities import CAPABILITIES
    others = [kinds.build(kinds.settings_for(kind, given, kind), kinds.SinkContext(header),
                          CAPABILITIES[be.name].fields) for kind, given in specs]
    log.heads_to = [s for s in others if not isinstance(s, RotatingFileSink)]
    auditor = Auditor(be, rs, [log, *others])
    consumer = threading.Thread(target=auditor.run, name="consumer")
    cpu0 = cpu_seconds()
    consumer.start()
    auditor.running.wait(10)
    timing = Workload(exe, workdir, rounds).finish()
    deadline = time.monotonic() + 60
    # until every event has come through (the backend's loss counters are always
    # there, zero while nothing is lost)
    while auditor.events < rounds * EVENTS_PER_ROUND and time.monotonic() < deadline \
            and not sum(be.lost().values()):
        time.sleep(0.05)
    auditor.stop()
    consumer.join()
    lost = sum(auditor.finish().values())
    auditor.close()                     # every sink hands on what it holds
    cpu = cpu_seconds() - cpu0
    sinks = {s.name: s.stats() for s in [log, *others]}
    sent = min((st["sent"] for st in sinks.values() if "sent" in st), default=0)
    got = rec.counts(before, sent) if remote else {}
    shutil.rmtree(out, ignore_errors=True)
    return dict(timing, events=auditor.events, lost=lost, consumer_cpu=cpu, sinks=sinks,
                received=got)


# -- auditd ------------------------------------------------------------------------------

def run_auditd(aud: Auditd, exe: str, workdir: str, rounds: int) -> dict:
    rule = ["-w", workdir, "-p", "wa", "-k", AUDIT_KEY]
    lost0 = audit_status().get("lost", 0)
    since = aud.size()
    subprocess.run(["auditctl", *rule], check=True, stdout=subprocess.DEVNULL)
    try:
        cpu_aud0 = auditd_cpu(aud)
        timing = Workload(exe, workdir, rounds).finish()
    finally:
        subprocess.run(["auditctl", "-W", *rule[1:]], stdout=subprocess.DEVNULL)
    time.sleep(1.0)                     # auditd writes asynchronously
    return {**timing, "events": aud.count(since, AUDIT_KEY),
            "lost": audit_status().get("lost", 0) - lost0,
            "consumer_cpu": auditd_cpu(aud) - cpu_aud0 if cpu_aud0 is not None else None}


def auditd_cpu(aud: Auditd) -> float | None:
    pid = aud.proc.pid if aud.proc else audit_status().get("pid")
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- start-up -----------------------------------------------------------------------------

STARTUP_CODE = r"""
import json, os, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
t0 = time.perf_counter()
from fswatchaudit.backends.ebpf import EbpfBackend
from fswatchaudit.rules import RuleSet, load, watch_rule
import bcc
t1 = time.perf_counter()
base = tempfile.mkdtemp(prefix="fswa-bench-start-")
rs = load(sys.argv[3:]) if sys.argv[3:] else RuleSet()
for i in range(int(sys.argv[2])):
    os.mkdir(f"{base}/d{i}")
    rs.add(watch_rule(f"{base}/d{i}", key=f"k{i}"))
t2 = time.perf_counter()
be = EbpfBackend(rs)
be.start()
t3 = time.perf_counter()
be.close()
t4 = time.perf_counter()
for i in range(int(sys.argv[2])):
    os.rmdir(f"{base}/d{i}")
os.rmdir(base)
print(json.dumps({"import": t1 - t0, "start": t3 - t2, "close": t4 - t3,
                  "rules": len(rs)}))
"""


def measure_startup(nrules: int, rules_file: str | None = None) -> dict:
    """Start-up in a fresh process with nrules directory watches (and the rules file)."""
    out = subprocess.run([sys.executable, "-c", STARTUP_CODE, os.path.dirname(HERE),
                          str(nrules), *([rules_file] if rules_file else [])],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def ways_of(args, rep: int, exe: str, workdir: str, elsewhere: str, tmp: str,
            rec: Receivers | None, aud: Auditd | None) -> list[tuple[str, Callable[[], dict]]]:
    """The ways of one repetition: (name, a function that runs it once)."""
    ways: list[tuple[str, Callable[[], dict]]] = [
        ("baseline", lambda: Workload(exe, workdir, args.rounds).finish()),
        ("unwatched", lambda: run_ebpf(exe, workdir, elsewhere, args.rounds, False))]
    if args.rules:
        ways.append((f"unwatched + {os.path.basename(args.rules)}",
                     lambda: run_ebpf(exe, workdir, elsewhere, args.rounds, False,
                                      args.rules)))
    ways.append(("watched",
                 lambda: run_ebpf(exe, workdir, workdir, args.rounds, True, args.rules)))
    if rec is not None:
        ways.append(("watched, log + jsonl + auditd files",
                     lambda: run_all_sinks(exe, workdir, args.rounds, rec, tmp, rep,
                                           remote=False)))
        ways.append(("watched, all sinks",
                     lambda: run_all_sinks(exe, workdir, args.rounds, rec, tmp, rep)))
    if aud is not None:
        def audited() -> dict:
            with aud:
                return run_auditd(aud, exe, workdir, args.rounds)
        ways.append(("auditd -w DIR -p wa", audited))
    return ways


# -- a fresh filesystem for every run ------------------------------------------------------

FS_IMAGE_MB = 256
FS_INODES = 131072


class FreshFilesystem:
    """A new ext4 filesystem (a RAM-backed image on /dev/shm, loop-mounted) at the same
    mount point for every run.  On a filesystem that lives on, each run is slowed by
    the runs before it: ext4 does not reuse an inode freed in the last 30 seconds
    (``recently_deleted``), and every new inode of the workload scans past all of them,
    so a run's cost depends on how many files the runs before it deleted and how long
    ago (measured: up to a fifth of a run's time, depending on the order of the ways).
    A fresh filesystem starts every way from the same state."""

    def __init__(self, mountpoint: str) -> None:
        self.mountpoint = mountpoint
        fd, self.image = tempfile.mkstemp(prefix="fswa-bench-", suffix=".ext4",
                                          dir="/dev/shm")
        os.close(fd)
        os.makedirs(mountpoint, exist_ok=True)

    def __enter__(self) -> FreshFilesystem:
        with open(self.image, "r+b") as fh:
            fh.truncate(0)
            fh.truncate(FS_IMAGE_MB << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-N", str(FS_INODES),
                        "-E", "lazy_itable_init=0,lazy_journal_init=0", self.image],
                       check=True)
        subprocess.run(["mount", "-o", "loop", self.image, self.mountpoint], check=True)
        for sub in ("work", "elsewhere"):
            os.mkdir(os.path.join(self.mountpoint, sub))
        return self

    def __exit__(self, *exc: object) -> None:
        if subprocess.run(["umount", self.mountpoint]).returncode != 0:
            subprocess.run(["umount", "-l", self.mountpoint])

    def remove(self) -> None:
        try:
            os.unlink(self.image)
        except OSError:
            pass


# -- main ---------------------------------------------------------------------------------

def main() -> None:
    global PIN_CPU
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10000,
                    help=f"workload rounds ({OPS_PER_ROUND} file operations each)")
    ap.add_argument("--repeat", type=int, default=15, help="repetitions of every way")
    ap.add_argument("--startup-repeat", type=int, default=3,
                    help="start-up measurements (fresh processes)")
    ap.add_argument("--cpu", type=int, default=PIN_CPU,
                    help="pin the workload to this CPU (default: the last one; -1: do "
                         "not pin)")
    ap.add_argument("--no-auditd", action="store_true", help="skip the auditd comparison")
    ap.add_argument("--no-sinks", action="store_true",
                    help="skip the run through every sink (and their receivers)")
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON")
    ap.add_argument("--rules", metavar="FILE",
                    help="load this rules file in the eBPF runs and the start-up "
                         "measurement (bench/stig-like.rules)")
    ap.add_argument("--startup-only", action="store_true",
                    help="measure only the start-up time")
    ap.add_argument("--same-fs", action="store_true",
                    help="run every way in one directory of /tmp instead of on a fresh "
                         "ext4 filesystem each time (see FreshFilesystem)")
    ap.add_argument("--wait-quiet", type=float, default=60.0, metavar="SECONDS",
                    help="before each run, wait up to this long for other tools' BPF "
                         "tracing programs to be gone (default %(default)s)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the eBPF backend and auditctl need it")
    if args.rules:
        from fswatchaudit.rules import RuleError
        try:
            load([args.rules])
        except RuleError as exc:
            raise SystemExit(f"bench_ebpf: {exc}") from None

    PIN_CPU = None if args.cpu is None or args.cpu < 0 else args.cpu
    if PIN_CPU is not None and PIN_CPU not in os.sched_getaffinity(0):
        raise SystemExit(f"bench_ebpf: CPU {PIN_CPU} is not available here")
    tmp = tempfile.mkdtemp(prefix="fswa-bench-", dir="/tmp")
    fresh = None if args.same_fs else FreshFilesystem(os.path.join(tmp, "fs"))
    base = fresh.mountpoint if fresh else tmp
    workdir, elsewhere = os.path.join(base, "work"), os.path.join(base, "elsewhere")
    if fresh is None:
        os.mkdir(workdir)
        os.mkdir(elsewhere)
    exe = build_workload(tmp)
    use_auditd = bool(shutil.which("auditctl")) and not args.no_auditd
    results: dict[str, list[dict]] = collections.defaultdict(list)
    rec: Receivers | None = None
    try:
        startup = [measure_startup(0 if args.rules else 10, args.rules)
                   for _ in range(args.startup_repeat)]
        aud = Auditd(tmp) if use_auditd and not args.startup_only else None
        rec = None if args.no_sinks or args.startup_only else Receivers(tmp)
        for rep in range(0 if args.startup_only else args.repeat):
            ways = ways_of(args, rep, exe, workdir, elsewhere, tmp, rec, aud)
            # the order moves by one at every repetition: no way always runs first
            # or right after another one's teardown
            k = rep % len(ways)
            for way, run in ways[k:] + ways[:k]:
                with fresh if fresh is not None else contextlib.nullcontext():
                    foreign = wait_quiet(args.wait_quiet)
                    results[way].append(dict(run(), foreign_progs=foreign, rep=rep))
            print(f"repetition {rep + 1}/{args.repeat} done", file=sys.stderr)
    finally:
        if rec is not None:
            rec.close()
        if fresh is not None:
            fresh.remove()
        shutil.rmtree(tmp, ignore_errors=True)

    if args.json:
        print(json.dumps({"startup": startup, "results": results}, indent=1))
    report(args, startup, results)


def login_uid() -> str:
    try:
        with open("/proc/self/loginuid") as fh:
            value = fh.read().strip()
    except OSError:
        return "unknown"
    return "unset" if value == "4294967295" else value


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def paired(runs: list[dict], base: list[dict], key: str) -> list[float]:
    """Each run's ``key`` divided by that of the baseline run of its repetition."""
    by_rep = {r["rep"]: r[key] for r in base}
    return [r[key] / by_rep[r["rep"]] for r in runs if r.get("rep") in by_rep]


def ratio_summary(ratios: list[float]) -> dict[str, float]:
    lo, med, hi = quartiles(ratios)
    return {"median": med, "p25": lo, "p75": hi, "min": min(ratios), "max": max(ratios)}


def cost(results: dict[str, list[dict]], way: str, key: str = "workload_cpu") -> dict:
    """The paired ratio of a way against the baseline (the verdict's figure)."""
    return ratio_summary(paired(results[way], results["baseline"], key))


def fmt_ratio(r: dict[str, float]) -> str:
    return (f"{r['median']:.3f}x [{r['p25']:.3f}-{r['p75']:.3f}] "
            f"({r['min']:.2f}-{r['max']:.2f})")


def compact(values: list) -> str:
    """One value when every run gave it, else the range."""
    if all(v is None for v in values):
        return "-"
    known = [v for v in values if v is not None]
    if len(set(known)) == 1 and len(known) == len(values):
        return f"{known[0]:,} (each run)" if isinstance(known[0], int) else str(known[0])
    return f"{min(known):,}-{max(known):,}" + ("" if len(known) == len(values) else " (?)")


def report(args, startup: list[dict], results: dict[str, list[dict]]) -> None:
    st = [s["start"] for s in startup]
    what = (f"the {startup[0]['rules']} rules of {args.rules}" if args.rules
            else "10 rules")
    print(f"start-up with {what} (compile + load + maps, fresh process): "
          f"median {statistics.median(st):.3f} s (runs: "
          + ", ".join(f"{s:.3f}" for s in st) + "); "
          f"imports {statistics.median(s['import'] for s in startup):.3f} s; "
          f"close {statistics.median(s['close'] for s in startup):.3f} s")
    if not results:
        return
    nops = args.rounds * OPS_PER_ROUND
    print(f"workload: {args.rounds} rounds x {OPS_PER_ROUND} = {nops} file operations, "
          f"{args.rounds * EVENTS_PER_ROUND} auditable events per run; "
          f"{args.repeat} interleaved repetitions; "
          + ("in one directory of /tmp" if args.same_fs else
             f"on a fresh {FS_IMAGE_MB} MB ext4 filesystem each run")
          + "; workload pinned to "
          + ("no CPU" if PIN_CPU is None else f"CPU {PIN_CPU}")
          + f"; kernel {os.uname().release}, {os.cpu_count()} CPUs; workload login uid "
          f"{login_uid()}" + (f"; eBPF runs with {args.rules}" if args.rules else "") + "\n")
    print("Ratios: median of the paired ratios (each run against the baseline run of its "
          "repetition) [quartiles] (range).\n")
    print("| way | wall median | wall ratio | workload CPU median | CPU ratio | "
          "events delivered | events lost | exactly once | consumer CPU | "
          "other processes' events |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for way, runs in results.items():
        ns = statistics.median(r["ns"] for r in runs)
        wcpu = statistics.median(r["workload_cpu"] for r in runs)
        once = [r.get("exactly_once") for r in runs]
        once_cell = "-" if all(v is None for v in once) else (
            "yes" if all(once) else "NO: " + "; ".join(
                f"missing {r['missing']} dup {r['duplicates']} extra {r['unexpected']}"
                for r in runs if not r.get("exactly_once")))
        ccpu = [r["consumer_cpu"] for r in runs if r.get("consumer_cpu") is not None]
        ccell = f"{min(ccpu):.2f}-{max(ccpu):.2f} s" if ccpu else "-"
        wall_r = "-" if way == "baseline" else fmt_ratio(cost(results, way, "ns"))
        cpu_r = "-" if way == "baseline" else fmt_ratio(cost(results, way))
        print(f"| {way} | {ns / 1e9:.3f} s | {wall_r} | {wcpu:.3f} s | {cpu_r} | "
              f"{compact([r.get('events') for r in runs])} | "
              f"{compact([r.get('lost') for r in runs])} | {once_cell} | {ccell} | "
              f"{compact([r.get('others') for r in runs])} |")
    print("\nverdict (paired workload-CPU ratio, median): " + "; ".join(
        f"{way} {cost(results, way)['median']:.3f}x" for way in results
        if way != "baseline"))
    for way in ("watched, log + jsonl + auditd files", "watched, all sinks"):
        for r in results.get(way, []):
            print(f"\n{way}: sinks (sent / lost / still queued; what the receivers "
                  "stored): "
                  + "; ".join(f"{name} {sink_cell(st)}" for name, st in r["sinks"].items())
                  + "".join(f"; received: {k} {v}" for k, v in r["received"].items()))
    foreign = sum(1 for runs in results.values() for r in runs if r.get("foreign_progs"))
    if foreign:
        print(f"\nWARNING: in {foreign} runs other tools' BPF tracing programs were loaded "
              "(they slow every run, the baseline too): the ratios are not clean")


def sink_cell(st: dict) -> str:
    if "records_written" in st:                 # a file sink
        return f"{st['records_written']} written / {st['records_dropped']} dropped"
    return f"{st.get('sent')} / {st.get('lost')} / {st.get('queued', 0)}" + (
        f" (spooled {st['spooled']})" if st.get("spooled") else "")


if __name__ == "__main__":
    main()
