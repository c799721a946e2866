"""Run the real `fswatchaudit trace` as a subprocess and collect its JSON events."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNPRIVILEGED_UID = 65534


class Trace:
    """`fswatchaudit trace --json ARGS` running until stop(); start() returns once the
    tool says it is really watching."""

    def __init__(self, *args: str, user: int | None = None, timeout: float = 60.0,
                 hostname: str | None = None):
        self.stdout = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "fswatchaudit", "trace", "--json", *args]
        if hostname is not None:
            # another host, as far as the trace can tell: a UTS namespace of its own
            cmd = ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"',
                   hostname, *cmd]
        env, cwd = None, REPO
        if user is not None:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
                   "--", *cmd]
            if not readable_by_others(REPO):
                # the checkout is out of the user's reach (a clone under /root): run a
                # copy of the package and its dependencies that it can read
                cwd = portable_copy()
                env = dict(os.environ, PYTHONPATH=cwd)
                cmd[cmd.index(sys.executable)] = "/usr/bin/python3"
        self.proc = subprocess.Popen(cmd, stdout=self.stdout, stderr=subprocess.PIPE,
                                     cwd=cwd, env=env, text=True)
        self.stderr_lines: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("trace exited before watching:\n" +
                                   "".join(self.stderr_lines) + self.proc.stderr.read())
            self.stderr_lines.append(line)
            if line.startswith("watching "):
                break
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("trace did not start:\n" + "".join(self.stderr_lines))

    def lines(self) -> int:
        """How many events it has printed so far."""
        self.stdout.flush()
        with open(f"/proc/self/fd/{self.stdout.fileno()}", "rb") as fh:
            return fh.read().count(b'{"t":"ev"')

    def wait_for(self, count: int, timeout: float = 20.0) -> None:
        """Wait until at least ``count`` events were printed (a workload step is done)."""
        deadline = time.monotonic() + timeout
        while self.lines() < count:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"trace printed {self.lines()} events, "
                                     f"expected at least {count}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGINT) -> tuple[list[dict], str, int]:
        """Stop the trace; return its events, its whole stderr and its exit code."""
        self.proc.send_signal(sig)
        rest = self.proc.stderr.read()
        code = self.proc.wait(timeout=60)
        self.stdout.seek(0)
        records = [json.loads(line) for line in self.stdout.read().decode().splitlines()]
        self.records = records
        events = [r for r in records if r["t"] == "ev"]
        return events, "".join(self.stderr_lines) + rest, code


_PORTABLE: str | None = None


def portable_copy() -> str:
    """fswatchaudit and its pure dependencies copied where any user can read them."""
    global _PORTABLE
    if _PORTABLE is None:
        import atexit
        import importlib
        import shutil
        base = tempfile.mkdtemp(prefix="fswa-portable-", dir="/tmp")
        os.chmod(base, 0o755)
        for name in ("fswatchaudit", "msgpack", "structlog", "inotify_simple"):
            mod = importlib.import_module(name)
            src = os.path.dirname(mod.__file__) if mod.__file__.endswith("__init__.py") \
                else mod.__file__
            dst = os.path.join(base, os.path.basename(src))
            (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
        for root, dirs, files in os.walk(base):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        atexit.register(shutil.rmtree, base, True)
        _PORTABLE = base
    return _PORTABLE


def sh(script: str, cwd: str, user: int | None = None) -> None:
    cmd = ["sh", "-ec", script]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--", *cmd]
    subprocess.run(cmd, cwd=cwd, check=True)


def readable_by_others(path: str) -> bool:
    """Can an unprivileged user reach this path (every ancestor searchable)?"""
    path = os.path.abspath(path)
    while True:
        st = os.stat(path)
        if not st.st_mode & 0o001:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def drain(backend, quiet: float = 0.3) -> list:
    """The events a backend has, read until it has been quiet for a moment, selected
    and keyed by the rules as the consumer does (process state records are left out)."""
    from fswatchaudit.events import Event
    out = []
    while True:
        got = backend.read(quiet)
        if not got:
            events = [e for e in out if isinstance(e, Event)]
            return [e for e in events if backend.rules.select(e) is not None]
        out += got
