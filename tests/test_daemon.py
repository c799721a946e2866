"""The real `fswatchaudit daemon`, started as root in a subprocess with its own rules.d,
log directory, control socket and a fake $NOTIFY_SOCKET; its logs are read back with
`fswatchaudit log show --json --all`."""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from fswatchaudit.service import control

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon runs as root")

# inotify always; auto is whatever is best here (eBPF once it is usable).
BACKENDS = ["inotify", "auto"]


def fswatchaudit(*args: str, check: bool = True, timeout: float = 60
                 ) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "fswatchaudit", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"fswatchaudit {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}{proc.stderr}")
    return proc


def wait_until(cond, what: str, timeout: float = 30.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


class Daemon:
    """One daemon run in a scratch directory: base/{rules.d,log,run,w}."""

    def __init__(self, base: str, backend: str, abstract_notify: bool = False,
                 **settings: object) -> None:
        self.base = base
        self.rules_dir = os.path.join(base, "rules.d")
        self.log_dir = settings.pop("log_dir", os.path.join(base, "log"))
        self.socket = os.path.join(base, "run", "control.sock")
        self.conf = os.path.join(base, "fswatchaudit.conf")
        os.makedirs(self.rules_dir, exist_ok=True)
        conf = {"rules_dir": self.rules_dir, "log_dir": self.log_dir,
                "control_socket": self.socket, "backend": backend,
                "status_interval": 0.2, "space_left": "0", **settings}
        self.settings = conf
        self.write_config(conf)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract_notify:
            name = f"fswa-test-{os.getpid()}-{id(self)}"
            self.notify.bind("\0" + name)
            self.notify_address = "@" + name
        else:
            self.notify_address = os.path.join(base, "notify")
            self.notify.bind(self.notify_address)
        self.messages: list[dict[str, str]] = []
        self.inbox: queue.Queue = queue.Queue()
        threading.Thread(target=self._collect, daemon=True).start()
        self.proc: subprocess.Popen | None = None
        self.stderr_path = os.path.join(base, "daemon.stderr")

    def write_config(self, conf: dict) -> None:
        with open(self.conf, "w") as fh:
            fh.write("".join(f"{k} = {v}\n" for k, v in conf.items()))

    def write_rules(self, name: str, text: str) -> None:
        with open(os.path.join(self.rules_dir, name), "w") as fh:
            fh.write(text)

    def start(self) -> None:
        env = dict(os.environ, NOTIFY_SOCKET=self.notify_address)
        self.stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fswatchaudit", "daemon", "--config", self.conf],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=self.stderr)

    def stderr_text(self) -> str:
        with open(self.stderr_path) as fh:
            return fh.read()

    def _collect(self) -> None:
        """Read every datagram as it comes (a full socket queue would lose messages)."""
        while True:
            try:
                data = self.notify.recv(4096)
            except OSError:
                return
            if not data:
                return
            self.inbox.put(dict(line.split("=", 1)
                                for line in data.decode().splitlines() if line))

    def wait_message(self, key: str, timeout: float = 120.0) -> dict[str, str]:
        """The next sd_notify message carrying key (all are kept in .messages)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} from the daemon; stderr:\n"
                                     + self.stderr_text())
            try:
                msg = self.inbox.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None and self.inbox.empty():
                    raise AssertionError(f"daemon exited {self.proc.returncode} before "
                                         f"{key}:\n" + self.stderr_text()) from None
                continue
            self.messages.append(msg)
            if key in msg:
                return msg

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return fswatchaudit("ctl", "--socket", self.socket, *args, check=check)

    def status(self) -> dict:
        """Status over the socket directly (polled often; `ctl -s` is tested once)."""
        reply = control.request(self.socket, {"op": "status"})
        assert reply["ok"], reply
        return reply["status"]

    def rules(self) -> list[str]:
        return self.ctl("-l").stdout.splitlines()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=120)
        self.stderr.close()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify.shutdown(socket.SHUT_RDWR)
        self.notify.close()

    def records(self) -> list[dict]:
        out = fswatchaudit("log", "show", "--json", "--all",
                           os.path.join(self.log_dir, "audit.log")).stdout
        return [json.loads(line) for line in out.splitlines()]


def as_nobody(*args: str) -> subprocess.CompletedProcess:
    """fswatchaudit ARGS as uid/gid 65534 without supplementary groups."""
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "--", sys.executable, "-m", "fswatchaudit", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def events(records: list[dict]) -> list[dict]:
    return [r for r in records if "op" in r and "seq" in r]


def count(records: list[dict], op: str, path: str) -> int:
    return sum(1 for e in events(records) if e["op"] == op and e.get("path") == path)


@pytest.fixture
def base():
    d = tempfile.mkdtemp(prefix="fswa-daemon-", dir="/tmp")
    yield d
    subprocess.run(["umount", "-q", os.path.join(d, "log")], check=False)
    shutil.rmtree(d, ignore_errors=True)


class Workload:
    """mkdir DIR/NAME-N in a loop on its own thread until stopped: events that happen
    while rules change."""

    def __init__(self, directory: str, name: str) -> None:
        self.directory, self.name = directory, name
        self.made: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            path = os.path.join(self.directory, f"{self.name}-{n}")
            os.mkdir(path)
            self.made.append(path)
            n += 1
            time.sleep(0.002)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join()
        return self.made


@pytest.mark.parametrize("backend", [*BACKENDS, "fanotify"])
def test_daemon_lifecycle(base, backend):
    w = {n: os.path.join(base, "w", n) for n in "abc"}
    for d in w.values():
        os.makedirs(d)
    dm = Daemon(base, backend)
    dm.write_rules("10-a.rules", f"-w {w['a']} -p wa -k a\n")
    expected: list[str] = []     # mkdir'ed paths that must be logged exactly once
    unexpected: list[str] = []   # mkdir'ed paths no rule covered
    try:
        unexpected.append(os.path.join(w["a"], "before-start"))
        os.mkdir(unexpected[-1])
        dm.start()
        ready = dm.wait_message("READY")
        assert ready["READY"] == "1"
        assert not any("READY" in m for m in dm.messages[:-1])
        # READY=1 means watching: an operation right after it is recorded.
        expected.append(os.path.join(w["a"], "right-after-ready"))
        os.mkdir(expected[-1])

        st = json.loads(dm.ctl("-s", "--json").stdout)["status"]
        assert st["rules"] == 1 and st["state"] == "running"
        assert st["log_file"] == os.path.join(dm.log_dir, "audit.log")
        assert "events_lost" in st and "buffer_fill" in st and "records_written" in st
        assert "seconds_behind" in st["lag"]
        if backend != "auto":
            assert st["backend"] == backend
        sock = os.lstat(dm.socket)
        assert stat.S_IMODE(sock.st_mode) == 0o600 and sock.st_uid == 0
        assert stat.S_IMODE(os.lstat(os.path.dirname(dm.socket)).st_mode) == 0o700
        # root only: the modes keep uid 65534 out, and with them loosened SO_PEERCRED does
        out = as_nobody("ctl", "--socket", dm.socket, "-l")
        assert out.returncode == 1 and "permission denied (root only)" in out.stderr
        modes = {p: stat.S_IMODE(os.stat(p).st_mode)
                 for p in (base, os.path.dirname(dm.socket), dm.socket)}
        for p in modes:
            os.chmod(p, 0o777 if p == dm.socket else 0o711)
        out = as_nobody("ctl", "--socket", dm.socket, "-w", w["a"])
        assert out.returncode == 1 and "permission denied: root only" in out.stderr
        for p, mode in modes.items():
            os.chmod(p, mode)

        # add and delete a rule over the socket while operations go on
        load = Workload(w["a"], "during-ctl")
        dm.ctl("-w", w["b"], "-p", "wa", "-k", "b")
        expected.append(os.path.join(w["b"], "added"))
        os.mkdir(expected[-1])
        assert dm.rules() == [f"-w {w['a']} -p wa -k a", f"-w {w['b']} -p wa -k b"]
        dm.ctl("-a", "always,exit", "-F", f"dir={w['c']}", "-S", "fs-create", "-k", "c")
        expected.append(os.path.join(w["c"], "added-by-a"))
        os.mkdir(expected[-1])
        dm.ctl("-d", "always,exit", "-F", f"dir={w['c']}", "-S", "fs-create", "-k", "c")
        dm.ctl("-W", w["b"], "-p", "wa", "-k", "b")
        unexpected.append(os.path.join(w["b"], "after-delete"))
        os.mkdir(unexpected[-1])
        unexpected.append(os.path.join(w["c"], "after-delete"))
        os.mkdir(unexpected[-1])
        bad = dm.ctl("-W", w["b"], "-p", "wa", "-k", "b", check=False)
        assert bad.returncode != 0 and "no such rule" in bad.stderr
        bad = dm.ctl("-w", "relative/path", check=False)
        assert bad.returncode == 2 and "relative" in bad.stderr
        expected += load.stop()
        assert dm.rules() == [f"-w {w['a']} -p wa -k a"]

        # SIGHUP with a changed rules file: c comes, a stays (never unwatched)
        load = Workload(w["a"], "during-reload")
        dm.write_rules("10-a.rules", f"-w {w['a']} -p wa -k a\n-w {w['c']} -p wa -k c\n")
        other = "inotify" if backend == "auto" else "auto"
        dm.write_config({**dm.settings, "backend": other, "flush_interval": 0.5})
        dm.proc.send_signal(signal.SIGHUP)
        dm.wait_message("RELOADING")
        dm.wait_message("READY")
        expected.append(os.path.join(w["c"], "after-reload"))
        os.mkdir(expected[-1])
        expected += load.stop()
        assert dm.rules() == [f"-w {w['a']} -p wa -k a", f"-w {w['c']} -p wa -k c"]
        assert "setting changes only at restart" in dm.stderr_text()
        assert dm.status()["backend"] == st["backend"]

        # a bad configuration on reload is refused, the running one stays
        dm.write_config({**dm.settings, "rotate_cuont": 3})
        dm.proc.send_signal(signal.SIGHUP)
        dm.wait_message("READY")
        wait_until(lambda: "unknown key 'rotate_cuont'" in dm.stderr_text(),
                   "the configuration error")
        dm.write_config(dm.settings)

        # a broken file: refused with file:line, the previous rules stay in force
        dm.write_rules("20-bad.rules", "# comment\n-w relative/path\n")
        dm.proc.send_signal(signal.SIGHUP)
        dm.wait_message("RELOADING")
        dm.wait_message("READY")
        wait_until(lambda: "20-bad.rules:2:" in dm.stderr_text(), "the reload error")
        assert dm.rules() == [f"-w {w['a']} -p wa -k a", f"-w {w['c']} -p wa -k c"]
        expected.append(os.path.join(w["c"], "after-bad-reload"))
        os.mkdir(expected[-1])
        os.unlink(os.path.join(dm.rules_dir, "20-bad.rules"))

        # rotation: SIGUSR1 and ctl --rotate
        dm.proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: os.path.exists(os.path.join(dm.log_dir, "audit.log.1")),
                   "rotation on SIGUSR1")
        expected.append(os.path.join(w["a"], "after-rotate"))
        os.mkdir(expected[-1])
        dm.ctl("--rotate")
        assert os.path.exists(os.path.join(dm.log_dir, "audit.log.2"))
        expected.append(os.path.join(w["a"], "last"))
        os.mkdir(expected[-1])
        assert "state: running" in dm.ctl("-s").stdout.splitlines()
        dm.ctl("-D")
        assert dm.rules() == []
        unexpected.append(os.path.join(w["a"], "after-delete-all"))
        os.mkdir(unexpected[-1])

        st = dm.status()
        assert st["rules"] == 0 and st["reloads"] == 3
        assert dm.wait_message("STATUS")["STATUS"]
        assert dm.stop() == 0
        dm.wait_message("STOPPING")
    finally:
        dm.kill()
    assert "Traceback" not in dm.stderr_text()

    records = dm.records()
    for path in expected:
        assert count(records, "mkdir", path) == 1, path
    for path in unexpected:
        assert count(records, "mkdir", path) == 0, path
    seqs = [e["seq"] for e in events(records)]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    # every rule change is in the log, with the rules then in force
    changes = rule_records(records)
    assert [c["reason"] for c in changes] == \
        ["start", "add", "add", "delete", "delete", "reload", "delete-all"]
    assert changes[0]["rules"] == [f"-w {w['a']} -p wa -k a"]
    assert changes[-2]["rules"] == [f"-w {w['a']} -p wa -k a", f"-w {w['c']} -p wa -k c"]
    assert changes[-1]["rules"] == [] and changes[-1]["digest"] != changes[-2]["digest"]
    # a file begun after a change starts with the rules then in force
    headers = [r for r in records if r.get("t") == "hdr"]
    assert len(headers) == 3
    assert headers[0]["rules_digest"] == changes[0]["digest"]
    assert headers[-1]["rules_digest"] == changes[-2]["digest"]
    assert headers[-1]["rules"] == changes[-2]["rules"]


def rule_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("t") == "rules"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_rules_at_start_exit_2(base, backend):
    dm = Daemon(base, backend)
    dm.write_rules("10-ok.rules", f"-w {base} -p wa\n")
    dm.write_rules("20-bad.rules", "\n-w /x -p q\n")
    try:
        dm.start()
        assert dm.proc.wait(timeout=60) == 2
    finally:
        dm.kill()
    assert "20-bad.rules:2: bad permission letters 'q'" in dm.stderr_text()
    assert not any("READY" in m for m in dm.messages)


@pytest.mark.parametrize("rule, message", [
    ("-w {base}/missing/file -p wa", "cannot watch {base}/missing/file: its directory "
                                     "{base}/missing does not exist"),
    ("-a always,exit -F dir={base}/gone", "cannot watch {base}/gone: it does not exist"),
])
def test_check_gives_the_verdict_a_start_gives(base, rule, message):
    dm = Daemon(base, "inotify")
    dm.write_rules("10.rules", rule.format(base=base) + "\n")
    check = fswatchaudit("daemon", "--check", "--config", dm.conf, check=False)
    assert check.returncode == 2 and message.format(base=base) in check.stderr
    try:
        dm.start()
        assert dm.proc.wait(timeout=60) == 2
    finally:
        dm.kill()
    assert message.format(base=base) in dm.stderr_text()
    assert "Traceback" not in dm.stderr_text() + check.stderr


def test_rules_with_raw_bytes_in_names(base, tmp_path):
    """A rules file may name a path that is not UTF-8: it is watched as written, and
    `rules check` prints it back byte for byte."""
    raw = os.fsencode(base) + b"/d\xff"
    os.mkdir(raw)
    rules = tmp_path / "raw.rules"
    rules.write_bytes(b"-w " + raw + b" -p wa -k raw\n")
    r = subprocess.run([sys.executable, "-m", "fswatchaudit", "rules", "check", str(rules)],
                       capture_output=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"-w '" + raw + b"' -p wa -k raw\n"
    dm = Daemon(base, "inotify")
    dm.write_rules("10.rules", "")
    with open(os.path.join(dm.rules_dir, "10.rules"), "wb") as fh:
        fh.write(rules.read_bytes())
    try:
        dm.start()
        dm.wait_message("READY")
        with open(raw + b"/f", "w"):
            pass
        assert dm.stop() == 0
    finally:
        dm.kill()
    created = [r for r in dm.records() if r["t"] == "ev" and r["op"] == "create"]
    assert [r["path"].encode("utf-8", "surrogateescape") for r in created] == [raw + b"/f"]
    assert created[0]["keys"] == ["raw"]


def test_configured_sinks_run_beside_the_log_and_show_in_status(base):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()                                 # nothing listens there any more
    jsonl = os.path.join(base, "copy.jsonl")
    dm = Daemon(base, "inotify", **{"sink.copy.kind": "jsonl", "sink.copy.path": jsonl,
                                    "sink.central.kind": "syslog",
                                    "sink.central.address": f"tcp://127.0.0.1:{port}"})
    w = os.path.join(base, "w")
    os.makedirs(w)
    dm.write_rules("10.rules", f"-w {w} -p wa -k w\n")
    try:
        dm.start()
        dm.wait_message("READY")
        for n in range(20):
            os.mkdir(os.path.join(w, f"d{n}"))
        st = wait_until(lambda: (s := dm.status()).get("events", 0) >= 20 and s,
                        "the events")
        central = wait_until(lambda: (c := dm.status()["sinks"]["central"])["errors"] and c,
                             "the dead sink to be seen failing")
        assert central["sent"] == 0 and central["queued"] + central["lost"] > 0
        assert "sinks" in st and "copy" in st["sinks"]
        assert central["queue_limit"] == 100000
        shown = dm.ctl("-s").stdout
        assert any(line.startswith("sink central: sent=0, ") and "lost=" in line
                   for line in shown.splitlines()), shown
        assert dm.stop() == 0
    finally:
        dm.kill()
    with open(jsonl) as fh:
        copied = [json.loads(line) for line in fh]
    logged = dm.records()
    assert [r for r in copied if r["t"] == "ev"] == [r for r in logged if r["t"] == "ev"]
    assert "SINK FAILING" in dm.stderr_text()


def test_daemon_log_is_chained_and_sealed(base):
    key = os.path.join(base, "seal.key")
    made = fswatchaudit("log", "keygen", "--key-file", key, "--verify-key",
                        os.path.join(base, "verify.key"))
    assert made.returncode == 0
    dm = Daemon(base, "inotify", seal_key_file=key, seal_interval=1)
    w = os.path.join(base, "w")
    os.makedirs(w)
    dm.write_rules("10.rules", f"-w {w} -p wa -k w\n")
    try:
        dm.start()
        dm.wait_message("READY")
        for n in range(10):
            os.mkdir(os.path.join(w, f"d{n}"))
        wait_until(lambda: dm.status().get("events", 0) >= 10, "the events")
        assert dm.stop() == 0
    finally:
        dm.kill()
    log = os.path.join(dm.log_dir, "audit.log")
    ok = fswatchaudit("log", "verify", "--key", os.path.join(base, "verify.key"), log)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    with open(log, "r+b") as fh:                 # a root attacker edits one path
        data = fh.read()
        at = data.index(b"/d5")
        fh.seek(at)
        fh.write(b"/x5")
    bad = fswatchaudit("log", "verify", "--key", os.path.join(base, "verify.key"), log,
                       check=False)
    assert bad.returncode == 1 and "byte" in bad.stdout + bad.stderr


def test_systemd_unit_verifies(tmp_path):
    """systemd-analyze verify on the shipped unit, ExecStart pointed at this checkout's
    command (verify insists that the program exists)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing: scripts/setup installs Debian's systemd"
    exe = os.path.join(os.path.dirname(sys.executable), "fswatchaudit")
    assert os.access(exe, os.X_OK)
    with open(os.path.join(REPO, "systemd", "fswatchaudit.service")) as fh:
        unit = fh.read()
    assert "\nExecStart=/usr/local/bin/fswatchaudit daemon " in unit
    unit = unit.replace("=/usr/local/bin/fswatchaudit ", f"={exe} ")
    assert "=/usr/local/bin" not in unit
    path = tmp_path / "fswatchaudit.service"
    path.write_text(unit)
    proc = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fswatchaudit.service" not in proc.stderr, proc.stderr
    for line in ("Type=notify", "Restart=on-failure", "ProtectSystem=strict",
                 "ReadWritePaths=/var/log/fswatchaudit", "ProtectHome=read-only",
                 "PrivateTmp=yes", "NoNewPrivileges=yes", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert f"\n{line}\n" in unit


# -- disk full ------------------------------------------------------------------------

def mount_tmpfs(path: str, size: str) -> None:
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path],
                   check=True)


def fill(directory: str, name: str = "filler") -> str:
    """Take every free block of the file system."""
    path = os.path.join(directory, name)
    chunk = b"\0" * 4096
    with open(path, "wb", buffering=0) as fh:
        while True:
            try:
                fh.write(chunk)
            except OSError:
                break
    return path


def mkdirs(directory: str, prefix: str, n: int) -> list[str]:
    made = []
    for i in range(n):
        path = os.path.join(directory, f"{prefix}-{i}")
        os.mkdir(path)
        made.append(path)
    return made


def start_on_tmpfs(base: str, backend: str, size: str, **settings) -> tuple[Daemon, str]:
    watched = os.path.join(base, "w")
    os.makedirs(watched)
    mount_tmpfs(os.path.join(base, "log"), size)
    dm = Daemon(base, backend, abstract_notify=True, flush_interval=0.05, **settings)
    dm.write_rules("10-w.rules", f"-w {watched} -p wa -k w\n")
    dm.start()
    dm.wait_message("READY")
    return dm, watched


def flushed(dm: Daemon, n: int) -> bool:
    """The daemon has seen n events and its buffer is empty (written or dropped)."""
    st = dm.status()
    return st.get("events", 0) >= n and st.get("buffer_bytes") == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_disk_full_keep_going(base, backend):
    dm, w = start_on_tmpfs(base, backend, "512k", disk_full_action="keep-going",
                           rotate_size="64K", rotate_count=2)
    try:
        before = mkdirs(w, "before", 20)
        wait_until(lambda: flushed(dm, 20), "events written before the disk fills")
        assert dm.status()["records_dropped"] == 0
        filler = fill(dm.log_dir)
        during = mkdirs(w, "during", 200)
        st = wait_until(lambda: (s := dm.status()).get("records_dropped", 0) > 0 and s,
                        "events counted as not written")
        assert st["state"] == "running"
        os.unlink(filler)
        after = mkdirs(w, "after", 20)
        wait_until(lambda: flushed(dm, 240), "events after the disk full")
        assert dm.stop() == 0
    finally:
        dm.kill()
    err = dm.stderr_text()
    assert "Traceback" not in err
    assert "disk" in err.lower()
    records = dm.records()
    for path in before + after:
        assert count(records, "mkdir", path) == 1, path
    assert all(count(records, "mkdir", p) <= 1 for p in during)
    # the gap is in the log, between the last event before it and the first after
    gaps = [r for r in records if r.get("t") == "dropped"]
    assert gaps and gaps[0]["count"] >= 1
    at = records.index(gaps[0])
    assert not any(e.get("path") in after for e in records[:at])


@pytest.mark.parametrize("backend", BACKENDS)
def test_disk_full_drop_oldest(base, backend):
    # 1M file system, 512K must stay free: rotated 64K files go, oldest first
    dm, w = start_on_tmpfs(base, backend, "1m", disk_full_action="drop-oldest",
                           rotate_size="64K", rotate_count=100, space_left="512K")
    made: list[str] = []
    try:
        # batches smaller than one rotated file: each write needs at most one deletion
        for batch in range(60):
            made += mkdirs(w, f"b{batch}", 100)
            wait_until(lambda n=len(made): flushed(dm, n), "events written")
        assert dm.status()["records_dropped"] == 0
        st = dm.status()
        assert st["state"] == "running"
        assert dm.stop() == 0
    finally:
        dm.kill()
    err = dm.stderr_text()
    assert "Traceback" not in err
    rotated = sorted(int(n.rsplit(".", 1)[1]) for n in os.listdir(dm.log_dir)
                     if n.startswith("audit.log."))
    assert rotated and rotated == list(range(1, len(rotated) + 1))
    assert os.statvfs(dm.log_dir).f_bavail * os.statvfs(dm.log_dir).f_frsize > 256 * 1024
    records = dm.records()
    # the oldest files went, the newest events are all there, none twice
    assert count(records, "mkdir", made[0]) == 0
    for path in made[-1000:]:
        assert count(records, "mkdir", path) == 1, path
    assert all(count(records, "mkdir", p) <= 1 for p in made)


@pytest.mark.parametrize("backend", BACKENDS)
def test_disk_full_stop(base, backend):
    dm, w = start_on_tmpfs(base, backend, "512k", disk_full_action="stop")
    try:
        before = mkdirs(w, "before", 20)
        wait_until(lambda: flushed(dm, 20), "events written before the disk fills")
        assert dm.status()["records_dropped"] == 0
        filler = fill(dm.log_dir)
        mkdirs(w, "during", 200)
        st = wait_until(lambda: (s := dm.status())["state"] != "running" and s,
                        "auditing to stop")
        assert st["state"].startswith("stopped")
        wait_until(lambda: "AUDITING STOPPED" in dm.wait_message("STATUS")["STATUS"],
                   "STATUS= to say that auditing stopped")
        refused = dm.ctl("-w", w, check=False)
        assert refused.returncode != 0 and "auditing stopped" in refused.stderr
        os.unlink(filler)                   # space comes back before the stop
        assert dm.stop() == 0
    finally:
        dm.kill()
    err = dm.stderr_text()
    assert "Traceback" not in err
    assert "AUDITING STOPPED" in err
    records = dm.records()
    for path in before:
        assert count(records, "mkdir", path) == 1, path
    # the log itself says what it could not store and that auditing stopped (before
    # the chain's closing seal)
    records = [r for r in records if r["t"] != "seal"]
    assert records[-2]["t"] == "dropped" and records[-2]["total"] > 0
    assert records[-1]["t"] == "mark" and records[-1]["what"] == "stop"
    assert "disk full" in records[-1]["reason"]


@pytest.mark.parametrize("make, message", [
    (lambda p: os.symlink("/tmp", p), "not a directory (a symlink is not followed)"),
    (lambda p: (os.mkdir(p), os.chmod(p, 0o1777)), "writable by group or others"),
    (lambda p: (os.mkdir(p), os.chown(p, 65534, 65534)), "owned by uid 65534"),
])
def test_unsafe_log_directory_is_refused(base, make, message):
    dm = Daemon(base, "inotify")
    dm.write_rules("10.rules", f"-w {base}\n")
    make(dm.log_dir)
    try:
        dm.start()
        assert dm.proc.wait(timeout=60) == 1
    finally:
        dm.kill()
    assert f"cannot use log directory {dm.log_dir}: {message}" in dm.stderr_text()


def test_second_daemon_refuses_a_live_socket(base):
    first = Daemon(base, "inotify")
    first.write_rules("10.rules", f"-w {base}\n")
    second = Daemon(os.path.join(base, "second"), "inotify")
    second.socket = first.socket
    second.write_config({**second.settings, "control_socket": first.socket})
    second.write_rules("10.rules", f"-w {base}\n")
    try:
        first.start()
        first.wait_message("READY")
        second.start()
        assert second.proc.wait(timeout=60) == 1
        assert "another daemon is listening" in second.stderr_text()
        assert first.status()["state"] == "running"
        assert first.stop() == 0
    finally:
        first.kill()
        second.kill()


# -- sd_notify ---------------------------------------------------------------------------

@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_sends_datagrams(tmp_path, abstract):
    from fswatchaudit.service.sdnotify import Notifier
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        rx.bind(f"\0fswa-notify-{os.getpid()}")
        address = f"@fswa-notify-{os.getpid()}"
    else:
        address = str(tmp_path / "notify")
        rx.bind(address)
    with rx:
        n = Notifier(address)
        assert n.enabled
        assert n.ready("1 rules\nwatching")
        assert rx.recv(4096) == b"READY=1\nSTATUS=1 rules watching\n"
        assert n.reloading()
        msg = rx.recv(4096).decode()
        assert msg.startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert n.stopping()
        assert rx.recv(4096) == b"STOPPING=1\n"
        n.close()


def test_notifier_without_socket_does_nothing(monkeypatch):
    from fswatchaudit.service.sdnotify import Notifier
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled and not n.ready()
    assert not Notifier("relative/path").enabled


def test_notifier_never_blocks_on_a_manager_that_does_not_read(tmp_path):
    from fswatchaudit.service.sdnotify import Notifier
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(tmp_path / "notify"))
    with rx:
        n = Notifier(str(tmp_path / "notify"))
        results = [n.status(f"update {i}") for i in range(5000)]
        assert results[0] and not all(results)
        assert n.errors == results.count(False)
        n.close()


def test_a_change_deeper_than_the_kernel_walks_is_reported_or_counted(base):
    """eBPF judges a change by walking up 16 directory levels to a watch or to a
    directory judged before; a walk that ends short is continued in programs of its own
    over up to 256 more levels.  So a change 22 levels down in a tree made before the
    start is reported; one in a tree deeper than that bound is counted as lost
    ("too_deep") in the status, `ctl -s` and the log, never dropped silently."""
    from fswatchaudit.backends import probe
    found = probe("ebpf")
    if not found.usable:
        pytest.skip(f"ebpf: {found.reason}")
    w = os.path.join(base, "w")
    old = w + "/old" + "/d" * 22
    os.makedirs(old)
    too = w + "/too" + "/d" * 300
    os.makedirs(too)
    dm = Daemon(base, "ebpf")
    dm.write_rules("10-w.rules", f"-w {w} -p wa -k deep\n")
    try:
        dm.start()
        dm.wait_message("READY")
        open(f"{old}/f", "w").close()
        os.chmod(too, 0o700)
        wait_until(lambda: dm.status()["events_lost"].get("too_deep"), "too_deep in status")
        deep = dm.status()["events_lost"]["too_deep"]
        assert f"too_deep={deep}" in dm.ctl("-s").stdout
        wait_until(lambda: count(dm.records(), "create", f"{old}/f") == 1, "the old tree's f")
        assert dm.stop() == 0
        records = dm.records()
        assert max(r["counts"].get("too_deep", 0) for r in records if r.get("t") == "lost") \
            >= deep
    finally:
        dm.kill()


def _cut_records(path: str, n: int) -> int:
    """Cut the last n whole records off a msgpack log (as root on the host could);
    the size left."""
    import msgpack
    with open(path, "rb") as fh:
        data = fh.read()
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(data)
    ends = []
    for _ in unpacker:
        ends.append(unpacker.tell())
    size = ends[-1 - n]
    os.truncate(path, size)
    return size


def test_chain_heads_at_remote_receivers_show_a_truncated_tail(base):
    """The daemon sends its chain head to NATS, rsyslog and journald with its records;
    a tail cut off the log afterwards passes the chain check of a live log, but not the
    check against the heads any receiver holds, which names the truncation."""
    from receivers import Journald, NatsServer, Rsyslog, wait_for
    server = NatsServer(os.path.join(base, "js"))
    server.start()
    syslog_dir = os.path.join(base, "rsyslog")
    os.makedirs(syslog_dir)
    rsyslog = Rsyslog(syslog_dir)
    journald = Journald()
    try:
        dm = Daemon(base, "inotify", **{
            "sink.journal.kind": "journald", "sink.journal.socket": journald.socket,
            "sink.fleet.kind": "nats", "sink.fleet.servers": server.url,
            "sink.fleet.spool_dir": os.path.join(base, "spool"),
            "sink.central.kind": "syslog",
            "sink.central.address": f"tcp://127.0.0.1:{rsyslog.tcp}"})
        w = os.path.join(base, "w")
        os.makedirs(w)
        dm.write_rules("10.rules", f"-w {w} -p wa -k w\n")
        try:
            dm.start()
            dm.wait_message("READY")
            for n in range(40):
                os.mkdir(os.path.join(w, f"d{n}"))
                if n % 10 == 9:
                    time.sleep(1.2)             # several writes, several heads
            wait_until(lambda: dm.status().get("events", 0) >= 40, "the events")
            st = dm.status()
            assert st["heads_sent"] >= 2, st
            assert dm.stop() == 0
        finally:
            dm.kill()
        log = os.path.join(dm.log_dir, "audit.log")
        heads_file = os.path.join(base, "heads.txt")

        def syslog_heads():
            marks = [sd for _, _, msgid, sd in rsyslog.lines()
                     if msgid == "mark" and sd.get("fswatchaudit@32473", {}).get("what")
                     == "head"]
            return marks if marks and marks[-1]["fswatchaudit@32473"]["seq"] == str(
                final_seq) else None
        records = dm.records()
        final_seq = sum(1 for _ in records)     # one file, one part: every record
        wait_for(syslog_heads, "the last head at rsyslog")
        shutil.copy(rsyslog.out, heads_file)
        journal_file = os.path.join(base, "journal.json")
        entries = wait_for(lambda: (e := journald.entries("FSWATCHAUDIT_WHAT=head"))
                           and e[-1]["FSWATCHAUDIT_SEQ"] == str(final_seq) and e,
                           "the last head in the journal")
        with open(journal_file, "w") as fh:
            fh.write("".join(json.dumps(e) + "\n" for e in entries))
        sources = (["--nats", server.url], ["--heads", heads_file],
                   ["--heads", journal_file])
        for source in sources:
            ok = fswatchaudit("log", "verify", log, *source)
            assert "remote heads agree" in ok.stdout, ok.stdout
        _cut_records(log, 12)                    # the attacker cuts the tail
        live = fswatchaudit("log", "verify", "--live", log)    # the chain alone: fine
        assert live.returncode == 0, live.stderr
        for source in sources:
            bad = fswatchaudit("log", "verify", "--live", log, *source, check=False)
            assert bad.returncode == 1, bad.stdout + bad.stderr
            assert (f"log truncated after seq {final_seq - 12}" in bad.stderr
                    and f"the remote head says {final_seq}" in bad.stderr), bad.stderr
    finally:
        journald.stop()
        rsyslog.stop()
        server.stop()
