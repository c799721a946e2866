"""Process facts from /proc: read once per burst, a gone process remembered as gone,
and its events given the facts last read while it lived (marked stale)."""
from __future__ import annotations

import os
import subprocess
import time

from fswatchaudit.enrich import ProcessFacts
from fswatchaudit.events import Event


def event(pid: int) -> Event:
    return Event(op="create", path="/x", backend="t", pid=pid)


def test_facts_of_a_process_that_exits_are_kept_and_marked_stale():
    proc = subprocess.Popen(["sleep", "30"])
    deadline = time.monotonic() + 10
    while not os.readlink(f"/proc/{proc.pid}/exe").endswith("sleep"):   # exec'd yet?
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        facts = ProcessFacts(max_age=0.0)           # every event looks again
        alive = facts(event(proc.pid))
        assert (alive.comm, alive.stale) == ("sleep", None)
        assert alive.exe is not None and alive.exe.endswith("sleep")
    finally:
        proc.kill()
        proc.wait()
    gone = facts(event(proc.pid))
    assert gone.stale is True
    assert (gone.comm, gone.exe) == (alive.comm, alive.exe)   # as last read alive


def test_a_gone_process_is_looked_up_once_per_burst():
    proc = subprocess.Popen(["true"])
    proc.wait()
    facts = ProcessFacts(max_age=60.0)
    first = facts(event(proc.pid))
    assert first.stale is True and first.comm is None
    when, _, stale = facts.cache[proc.pid]
    for _ in range(100):
        assert facts(event(proc.pid)).stale is True
    assert facts.cache[proc.pid] == (when, {}, True)          # not read again
