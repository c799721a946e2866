"""Bounded memory: the ring buffer's size is what the kernel holds for a consumer that
falls behind; the consumer reads at most one batch at a time, so when it stops
reading the ring fills and the kernel counts every record it could not take, and the
summary tells them: events logged + events lost = every operation."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from tracehelp import REPO

WORKLOAD = os.path.join(REPO, "bench", "workload.c")
EVENTS_PER_ROUND = 4            # create, chmod, rename, unlink


def ebpf_usable() -> None:
    from fswatchaudit.backends import probe
    p = probe("ebpf")
    if not p.usable:
        pytest.skip(f"eBPF backend: {p.reason}")


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    exe = str(tmp_path_factory.mktemp("bin") / "workload")
    subprocess.run(["gcc", "-O2", "-o", exe, WORKLOAD], check=True)
    return exe


def start_trace(*args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "fswatchaudit", "trace", "--backend",
                             "ebpf", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stderr is not None
    lines = []
    while True:
        line = proc.stderr.readline()
        assert line, "trace exited before watching: " + "".join(lines)
        lines.append(line)
        if line.startswith("watching "):
            return proc


def own_memory_kib(pid: int) -> int:
    """VmRSS less the resident part of the BPF map mappings (the ring buffer)."""
    rss = ring = 0
    with open(f"/proc/{pid}/status") as fh:
        rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/smaps") as fh:
        in_map = False
        for line in fh:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                in_map = "bpf-map" in line
            elif in_map and line.startswith("Rss:"):
                ring += int(line.split()[1])
    return rss - ring


def ring_mapping_kib(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as fh:
        sizes = [int(b, 16) - int(a, 16) for a, b in
                 (line.split()[0].split("-") for line in fh if "bpf-map" in line)]
    return max(sizes) // 1024


def test_ring_buffer_size_option(tmp_path):
    ebpf_usable()
    proc = start_trace("--ring-buffer", "1M", str(tmp_path))
    try:
        # the data area is mapped twice after the producer page
        assert ring_mapping_kib(proc.pid) == 2 * 1024 + 4
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    bad = subprocess.run([sys.executable, "-m", "fswatchaudit", "trace", "--ring-buffer",
                          "3M", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "not a power of two" in bad.stderr


def test_a_stopped_consumer_loses_counted_events_not_memory(tmp_path, workload):
    ebpf_usable()
    watched = tmp_path / "w"
    watched.mkdir()
    writers = [watched / "a", watched / "b"]
    for d in writers:
        d.mkdir()
    log = tmp_path / "log"
    rounds = 20_000
    proc = start_trace("--ring-buffer", "1M", "-o", str(log), str(watched))
    try:
        before = own_memory_kib(proc.pid)
        os.kill(proc.pid, signal.SIGSTOP)           # the consumer falls behind
        try:
            loads = [subprocess.Popen([workload, str(rounds)], cwd=d,
                                      stdout=subprocess.DEVNULL) for d in writers]
            assert [p.wait(timeout=300) for p in loads] == [0, 0]
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        peak = before
        for _ in range(20):                         # while the backlog is read
            peak = max(peak, own_memory_kib(proc.pid))
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    events = int(re.search(r"^events: (\d+)", err, re.M).group(1))
    lost = int(re.search(r"^events lost: (\d+)", err, re.M).group(1))
    assert "ringbuf=" in err
    expected = len(writers) * rounds * EVENTS_PER_ROUND
    assert lost > 0, err                            # the 1 MB ring could not hold them
    assert events + lost == expected, err           # each one delivered or counted
    assert peak - before < 50 * 1024, (before, peak)   # no backlog in process memory
