"""One scripted workload, run against every backend this host has, compared with one
expected-event table (tests/conformance/workload.py + fswatchaudit.capabilities)."""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from tracehelp import REPO, Trace

from conformance.workload import STEPS, expected_for, prepare
from fswatchaudit import backends
from fswatchaudit.capabilities import CAPABILITIES, PROCESS_FIELDS, markdown_table

COMPARED = ("op", "path", "path2", "access", "syscall", "result")


@pytest.fixture
def tree():
    base = tempfile.mkdtemp(prefix="fswa-conf-", dir="/tmp")
    os.chmod(base, 0o755)
    watched, outside = os.path.join(base, "watched"), os.path.join(base, "outside")
    os.mkdir(watched, 0o755)
    os.mkdir(outside, 0o755)
    prepare(watched, outside)
    yield watched, outside
    shutil.rmtree(base)


def run_step(step, watched, outside) -> int:
    code = step.code.format(W=watched, O=outside) if "{" in step.code and not step.shell \
        else step.code
    # -I: imports never look in the (watched) cwd
    cmd = ["sh", "-ec", code] if step.shell else [sys.executable, "-I", "-c", code]
    if step.user is not None:
        cmd = ["setpriv", f"--reuid={step.user}", f"--regid={step.user}",
               "--clear-groups", "--", *cmd]
    proc = subprocess.Popen(cmd, cwd=watched)
    assert proc.wait(timeout=30) == 0, f"step {step.name!r} failed"
    return proc.pid


@pytest.mark.parametrize("backend", list(backends.BACKENDS))
def test_conformance(backend, tree):
    if os.geteuid() != 0:
        pytest.skip("the conformance workload needs root (chown, setpriv)")
    probe = backends.probe(backend)
    if not probe.usable:
        pytest.skip(f"backend {backend} is not usable here: {probe.reason}")
    watched, outside = tree
    cap = CAPABILITIES[backend]
    trace = Trace("--backend", backend, "-k", "conf", watched)
    expected: list[tuple[str, dict]] = []
    try:
        for step in STEPS:
            run_step(step, watched, outside)
            if step.needs and not getattr(cap, step.needs):
                continue        # a way around the watch this backend does not see
            for e in step.events:
                want = expected_for(backend, e, watched, outside)
                if want is not None:
                    expected.append((step.name, want))
            try:
                trace.wait_for(len(expected))
            except AssertionError:
                break           # the comparison below shows what is missing
    finally:
        events, stderr, code = trace.stop()
    assert code == 0, stderr
    got = [tuple(ev.get(k) for k in COMPARED) for ev in events]
    want = [tuple(w.get(k) for k in COMPARED) for _, w in expected]
    assert got == want, "\n".join(
        ["events differ from the table (step: expected | got)"] +
        [f"{expected[i][0] if i < len(expected) else '-'}: "
         f"{want[i] if i < len(want) else '-'} | {got[i] if i < len(got) else '-'}"
         for i in range(max(len(got), len(want)))])
    for (step_name, _), ev in zip(expected, events, strict=True):
        assert ev["backend"] == backend
        assert ev["keys"] == ["conf"]
        for f in PROCESS_FIELDS:
            if f in cap.fields and not ev.get("stale"):
                assert f in ev, f"{backend} must report {f} ({step_name}: {ev})"
            if f not in cap.fields:
                assert f not in ev, f"{backend} cannot know {f} but reported it ({ev})"
        if "uid" in cap.fields and not ev.get("stale"):
            step = next(s for s in STEPS if s.name == step_name)
            assert ev["uid"] == (step.user if step.user is not None else 0)
    assert "events lost: 0" in stderr


def test_readme_backend_table_is_generated():
    """The README's comparison table is the capability data, verbatim."""
    with open(os.path.join(REPO, "README.md")) as fh:
        readme = fh.read()
    assert markdown_table() in readme, \
        "README backend table is stale: paste `fswatchaudit backends --markdown`"
