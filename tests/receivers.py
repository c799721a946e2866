"""The real receivers of the remote sinks, started privately on this host: nats-server
with JetStream, rsyslog listening on UDP, TCP and a socket of its own, and a namespaced
systemd-journald.  The sink tests and the benchmark start them the same way."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Any

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
JOURNALD = "/lib/systemd/systemd-journald"
SD_ID = "fswatchaudit@32473"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def wait_port(port: int, timeout: float = 10.0) -> None:
    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            return False
    wait_for(listening, f"a server to listen on {port}", timeout)


class NatsServer:
    """One nats-server -js on 127.0.0.1, optionally a node of a cluster."""

    def __init__(self, store: str, name: str = "n1", cluster_port: int | None = None,
                 routes: list[int] | None = None) -> None:
        self.port, self.store, self.name = free_port(), store, name
        self.cluster_port, self.routes = cluster_port, routes or []
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port),
                "-sd", self.store, "-n", self.name]
        if self.cluster_port:
            args += ["--cluster_name", "fsa", "--cluster",
                     f"nats://127.0.0.1:{self.cluster_port}",
                     "--routes", ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


RSYSLOG_CONF = """
global(workDirectory="{base}")
module(load="imudp")
input(type="imudp" address="127.0.0.1" port="{udp}")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="{tcp}")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{base}/log.sock" UseSpecialParser="off" ParseHostname="on")
module(load="mmpstrucdata")
action(type="mmpstrucdata")
template(name="json" type="list") {{
  property(name="inputname") constant(value="|") property(name="app-name")
  constant(value="|") property(name="msgid") constant(value="|")
  property(name="$!rfc5424-sd") constant(value="\\n")
}}
action(type="omfile" file="{out}" template="json")
"""


class Rsyslog:
    """rsyslogd with a private configuration in ``base``: what it receives on UDP
    (``udp``), TCP (``tcp``) and its socket (``unix``) is parsed (RFC 5424 structured
    data as JSON) and stored in ``out``, one ``input|app|msgid|sd`` line a message."""

    def __init__(self, base: str) -> None:
        if shutil.which("rsyslogd") is None:
            raise RuntimeError("rsyslogd is not installed (scripts/setup installs it)")
        self.base = base
        self.udp, self.tcp = free_port(socket.SOCK_DGRAM), free_port()
        self.unix = os.path.join(base, "log.sock")
        self.out = os.path.join(base, "received.log")
        conf = os.path.join(base, "rsyslog.conf")
        with open(conf, "w") as fh:
            fh.write(RSYSLOG_CONF.format(base=base, udp=self.udp, tcp=self.tcp,
                                         out=self.out))
        self.proc = subprocess.Popen(["rsyslogd", "-n", "-f", conf, "-i",
                                      os.path.join(base, "pid")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: os.path.exists(self.unix), "rsyslog to listen")

    def lines(self) -> list[tuple[str, str, str, Any]]:
        """(input, app, msgid, structured data: parsed for events and marks)."""
        if not os.path.exists(self.out):
            return []
        with open(self.out) as fh:
            got = [line.rstrip("\n").split("|", 3) for line in fh if line.strip()]
        return [(i, app, msgid, json.loads(sd) if msgid in ("ev", "mark") else sd)
                for i, app, msgid, sd in got]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)


class Journald:
    """A systemd-journald of its own namespace (``socket``; read back with
    ``entries``), removed with what it stored at ``stop``."""

    def __init__(self, namespace: str | None = None, rate_limit: bool = True) -> None:
        if not os.access(JOURNALD, os.X_OK):
            raise RuntimeError("systemd-journald is not installed (scripts/setup installs "
                               "systemd)")
        if not os.path.exists("/etc/machine-id") or not open("/etc/machine-id").read().strip():
            subprocess.run(["systemd-machine-id-setup"], check=True, capture_output=True)
        self.namespace = namespace or f"fswa{os.getpid()}"
        self.conf: str | None = None
        if not rate_limit:          # keep every entry of a flood (a benchmark's)
            self.conf = f"/etc/systemd/journald@{self.namespace}.conf"
            with open(self.conf, "w") as fh:
                fh.write("[Journal]\nRateLimitIntervalSec=0\nRateLimitBurst=0\n"
                         "Storage=volatile\nRuntimeMaxUse=1G\n")
        self.socket = f"/run/systemd/journal.{self.namespace}/socket"
        self._start()

    def _start(self) -> None:
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        self.proc = subprocess.Popen([JOURNALD, self.namespace], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(self.socket), "journald to listen")
        # a namespace's journald exits after 30 s without a client: one stdout stream
        # (the protocol of a service's output; its header, then nothing) keeps it up
        stdout = os.path.join(os.path.dirname(self.socket), "stdout")
        wait_for(lambda: os.path.exists(stdout), "journald's stdout socket")
        self._stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._stream.connect(stdout)
        self._stream.sendall(b"fswatchaudit-test\n\n6\n0\n0\n0\n0\n")

    def ensure(self) -> None:
        """Start it again if it has gone: a namespace's journald exits after a while
        without clients."""
        if self.proc.poll() is not None:
            self._stream.close()
            self._start()

    def entries(self, *matches: str) -> list[dict[str, Any]]:
        r = subprocess.run(["journalctl", f"--namespace={self.namespace}", "-o", "json",
                            "--no-pager", *matches], capture_output=True, text=True)
        return [json.loads(line) for line in r.stdout.splitlines()]

    def stop(self) -> None:
        self._stream.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.conf is not None:
            os.unlink(self.conf)
        machine = open("/etc/machine-id").read().strip()
        for d in (f"/var/log/journal/{machine}.{self.namespace}",
                  f"/run/log/journal/{machine}.{self.namespace}",
                  f"/run/systemd/journal.{self.namespace}"):
            shutil.rmtree(d, ignore_errors=True)
