"""Hostile names through the real CLI on every backend: raw bytes (0xFF), newlines,
terminal escapes.  Each operation is logged once, losslessly; human lines cannot be
forged; JSON gives the bytes back."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from tracehelp import REPO, Trace

from fswatchaudit import backends

NAME = b".x\xff\nFORGED pid=1 \x1b[2J\x07"
NEW = b"y\xfe\r"


def usable(name):
    p = backends.probe(name)
    return pytest.param(name, marks=pytest.mark.skipif(not p.usable, reason=p.reason))


@pytest.fixture
def tree():
    base = tempfile.mkdtemp(prefix="fswa-names-", dir="/tmp")
    os.chmod(base, 0o755)
    watched = os.path.join(base, "w")
    os.mkdir(watched)
    yield base, watched
    shutil.rmtree(base)


def fsdecode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


@pytest.mark.parametrize("backend", [usable("ebpf"), usable("fanotify"), usable("inotify")])
def test_raw_bytes_and_control_characters_in_names(tree, backend):
    base, watched = tree
    log = os.path.join(base, "trace.log")
    trace = Trace("--backend", backend, "-o", log, watched)
    wdir = os.fsencode(watched)
    with open(wdir + b"/" + NAME, "wb"):
        pass
    os.rename(wdir + b"/" + NAME, wdir + b"/" + NEW)
    trace.wait_for(2)
    printed, stderr, code = trace.stop()
    assert code == 0, stderr
    assert "Traceback" not in stderr and "records not written" not in stderr
    created = fsdecode(wdir + b"/" + NAME)
    renamed = fsdecode(wdir + b"/" + NEW)
    ops = [(e["op"], e.get("path"), e.get("path2")) for e in printed
           if e["op"] in ("create", "rename")]
    assert ("create", created, None) in ops
    assert any(op == "rename" and (p2 == renamed or p == created) for op, p, p2 in ops)
    # the log holds the same records, and gives the exact bytes back
    r = subprocess.run([sys.executable, "-m", "fswatchaudit", "log", "show", "--json", log],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    logged = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x for x in logged if x["t"] == "ev"] == printed
    paths = {x.get("path") for x in logged if x["t"] == "ev"}
    assert created in paths and created.encode("utf-8", "surrogateescape").endswith(NAME)
    # human lines: one line per record, nothing raw reaches the terminal
    r = subprocess.run([sys.executable, "-m", "fswatchaudit", "log", "show", log],
                       capture_output=True, cwd=REPO)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert len(lines) == len(logged)
    assert not any(line.startswith(b"FORGED") for line in lines)
    assert b"\x1b" not in r.stdout and b"\x07" not in r.stdout and b"\r" not in r.stdout
    assert b".x\\xff\\nFORGED pid=1 \\x1b[2J\\x07" in r.stdout


def test_a_name_cannot_pass_for_fields_of_a_human_line():
    """A name with spaces and `key=value` text stays one quoted field: whatever reads
    the line by fields (grep, a syslog parser) finds the real ones only."""
    import shlex

    from fswatchaudit.events import Event
    from fswatchaudit.sinks.encode import format_event
    forged = '/srv/notes result=EPERM pid=1 uid=0(root) key=identity "x'
    ev = Event(op="create", path=forged, path2=None, backend="ebpf", pid=4242, uid=1000,
               comm='evil comm="', exe="/usr/bin/python3", keys=["srv"], aliases=[],
               result=0)
    line = format_event(ev)
    fields = shlex.split(line.split(None, 3)[3])    # after time, aliases, operation
    assert fields[0] == forged
    named = dict(f.split("=", 1) for f in fields[1:])
    assert named["pid"] == "4242" and named["comm"] == 'evil comm="'
    assert "result" not in named and named["key"] == "srv"
