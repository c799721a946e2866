"""Service mode: ``fswatchaudit daemon``.

Threads and who does what:
  consumer   Auditor.run(): reads the backend, writes events; rule changes run here
             (Auditor.call), so the backend and the log see one caller.
  control    the control socket (control.py), one request at a time.
  main       supervision: signals arrive as bytes on a wakeup pipe (the handlers only
             set flags), and reload, rotation, disk checks, sd_notify STATUS and
             shutdown are done from here.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import inspect
import os
import select
import signal
import stat
import sys
import threading
import time
from typing import Any

from . import backends, diag
from . import config as config_mod
from . import rules as rules_mod
from .auditor import Auditor
from .backends.base import BackendUnavailable
from .config import Config, ConfigError
from .control import ControlServer
from .rules import RuleError, RuleSet
from .sdnotify import Notifier

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NO_BACKEND = 3

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)

# Settings a reload cannot change in a running daemon.
RESTART_KEYS = ("backend", "ring_buffer_size", "log_dir", "log_file", "control_socket")


def load_rules(rules_dir: str) -> RuleSet:
    """The rules of rules_dir/*.rules, all or nothing; a missing directory is no rules."""
    if not os.path.isdir(rules_dir):
        raise RuleError("rules directory does not exist", rules_dir)
    return rules_mod.load([rules_dir])


def prepare_log_dir(path: str) -> None:
    """Create the log directory root-only; never through a symlink."""
    parent = os.path.dirname(path.rstrip("/")) or "/"
    os.makedirs(parent, 0o755, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, "not a directory (a symlink is not followed)", path)
    if st.st_uid != os.geteuid():
        raise OSError(errno.EPERM, f"owned by uid {st.st_uid}, not root", path)
    if st.st_mode & 0o022:
        raise OSError(errno.EPERM, "writable by group or others (chmod go-w)", path)


def make_backend(cfg: Config, rules: RuleSet, log) -> backends.Backend:
    cls, probes = backends.select(cfg.backend)
    log.info("backend selected", detail=backends.selection_reason(probes))
    kwargs: dict[str, Any] = {}
    if "ringbuf_pages" in inspect.signature(cls.__init__).parameters:
        kwargs["ringbuf_pages"] = max(1, cfg.ring_buffer_size // os.sysconf("SC_PAGE_SIZE"))
    backend = cls(rules, **kwargs)
    backend.start()
    return backend


def writer_options(cfg: Config) -> dict[str, Any]:
    """LogWriter keyword arguments for a configuration."""
    space_left: int | str = cfg.space_left
    if not cfg.space_left.endswith("%"):
        space_left = config_mod.parse_size(cfg.space_left)
    return {"flush_interval": cfg.flush_interval, "fsync": cfg.fsync,
            "rotate_size": cfg.rotate_size, "rotate_count": cfg.rotate_count,
            "disk_full": cfg.disk_full_action, "space_left": space_left}


class Daemon:
    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self.log = diag.get_logger("daemon")
        self.notifier = Notifier()
        self.cfg: Config | None = None
        self.backend: backends.Backend | None = None
        self.writer = None
        self.auditor: Auditor | None = None
        self.control: ControlServer | None = None
        self.consumer: threading.Thread | None = None
        self.consumer_error: BaseException | None = None
        self.started = time.time()
        self.reloads = 0
        self.write_errors = 0
        self.suspended: str | None = None   # why auditing stopped (disk-full "stop")
        self._lock = threading.Lock()       # one rule change at a time

    # -- start -------------------------------------------------------------------
    def run(self) -> int:
        """Start, supervise until SIGTERM, stop; the exit status.  Signals are caught
        from the first moment: one that comes during start-up (a reload, a stop) is
        acted on once the daemon is up, never lost or fatal."""
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._install_signals(wake_w)
        try:
            return self._run(wake_r)
        finally:
            signal.set_wakeup_fd(-1)
            for sig in HANDLED_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            os.close(wake_r)
            os.close(wake_w)

    def _run(self, wake_r: int) -> int:
        try:
            self.cfg = config_mod.load(self.config_path)
        except ConfigError as exc:
            print(f"fswatchaudit: {exc}", file=sys.stderr)
            return EXIT_USAGE
        cfg = self.cfg
        try:
            rules = load_rules(cfg.rules_dir)
        except RuleError as exc:
            print(f"fswatchaudit: {exc}", file=sys.stderr)
            return EXIT_USAGE
        try:
            prepare_log_dir(cfg.log_dir)
        except OSError as exc:
            print(f"fswatchaudit: cannot use log directory {cfg.log_dir}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return EXIT_FAILURE
        try:
            self.backend = make_backend(cfg, rules, self.log)
        except BackendUnavailable as exc:
            print(f"fswatchaudit: {exc}", file=sys.stderr)
            return EXIT_NO_BACKEND
        except RuleError as exc:
            print(f"fswatchaudit: {exc}", file=sys.stderr)
            return EXIT_USAGE
        try:
            self._open_writer(rules)
        except OSError as exc:
            print(f"fswatchaudit: cannot write the log {cfg.log_path}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            self._teardown()
            return EXIT_FAILURE
        try:
            self.auditor = Auditor(self.backend, rules, [self._guard(self.writer.write_event)],
                                   state_sinks=[self._guard(self.writer.write_state)],
                                   on_lost=self._guard(self.writer.write_lost))
            self.control = ControlServer(cfg.control_socket, self.handle_request)
        except OSError as exc:
            print(f"fswatchaudit: cannot use the control socket {cfg.control_socket}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            self._teardown()
            return EXIT_FAILURE
        self._start_consumer()
        self.control.start()
        self.log.info("auditing", backend=self.backend.name, rules=len(rules),
                      log=cfg.log_path, socket=cfg.control_socket)
        self.notifier.ready(self.status_line())
        return self._supervise(wake_r)

    def _open_writer(self, rules: RuleSet) -> None:
        from . import log as log_mod
        from .cli import log_header
        assert self.cfg is not None and self.backend is not None
        # The writer puts headers in even below space_left (a start on a nearly full
        # disk is still a start); for events the disk-full action applies.
        self.writer = log_mod.LogWriter(
            self.cfg.log_path, log_header(self.backend.name, rules, daemon=True),
            **writer_options(self.cfg))
        self._record_rules(rules, "start")

    def _guard(self, write):
        """A log write that fails is counted and reported, never the end of the consumer
        (the writer itself carries out the disk-full policy)."""
        def sink(item) -> None:
            try:
                write(item)
            except Exception as exc:
                self.write_errors += 1
                if self.write_errors == 1 or self.write_errors % 10000 == 0:
                    self.log.error("LOG WRITE FAILED", error=str(exc),
                                   failures=self.write_errors)
        return sink

    def _install_signals(self, wake_w: int) -> None:
        """The interpreter's C-level handler writes each signal's number to the wakeup
        pipe (that is the flag, and it wakes the supervisor); the Python-level handler
        has nothing left to do."""
        def handler(signum: int, frame: object) -> None:
            pass
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, handler)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)

    def _start_consumer(self) -> None:
        assert self.auditor is not None
        auditor = self.auditor

        def consume() -> None:
            try:
                auditor.run()
            except BaseException as exc:  # reported by the supervisor
                self.consumer_error = exc
        self.consumer = threading.Thread(target=consume, name="consumer", daemon=True)
        self.consumer.start()
        # Rule changes must go through the loop once it runs: wait until it does.
        while not auditor.running.wait(0.05) and self.consumer.is_alive():
            pass

    # -- supervision ---------------------------------------------------------------
    def _supervise(self, wake_r: int) -> int:
        assert self.cfg is not None
        next_status = time.monotonic() + self.cfg.status_interval
        status = EXIT_OK
        while True:
            timeout = max(0.0, min(1.0, next_status - time.monotonic()))
            ready, _, _ = select.select([wake_r], [], [], timeout)
            pending: set[int] = set()
            if ready:
                try:
                    pending = set(os.read(wake_r, 4096))
                except BlockingIOError:
                    pass
            stop = pending & {signal.SIGTERM, signal.SIGINT}
            if stop:
                self.log.info("stopping", signal=signal.Signals(max(stop)).name)
                break
            if signal.SIGHUP in pending:
                self._safely(self.reload, "reload")
            if signal.SIGUSR1 in pending:
                self._safely(self.rotate, "rotation")
            if self.consumer is not None and not self.consumer.is_alive() \
                    and self.suspended is None:
                self.log.error("consumer stopped", error=str(self.consumer_error))
                status = EXIT_FAILURE
                break
            self._safely(self._check_disk, "disk check")
            if time.monotonic() >= next_status:
                self._safely(lambda: self.notifier.status(self.status_line()), "status")
                next_status = time.monotonic() + self.cfg.status_interval
        self.notifier.stopping()
        self._teardown()
        return status

    def _safely(self, fn, what: str) -> None:
        """Supervision goes on whatever one of its duties raises."""
        try:
            fn()
        except Exception as exc:
            self.log.error(f"{what} failed", error=str(exc), kind=type(exc).__name__)

    def _check_disk(self) -> None:
        """Carry out the "stop" disk-full action once the writer reports a full disk."""
        if self.suspended is None and getattr(self.writer, "stopped", False):
            self.suspend(getattr(self.writer, "stop_reason", None) or "log disk full")

    def suspend(self, reason: str) -> None:
        """Stop auditing but keep answering status, so the cause can be seen."""
        self.suspended = reason
        self.log.error("AUDITING STOPPED", reason=reason,
                       action=self.cfg.disk_full_action if self.cfg else None)
        if self.auditor is not None:
            self.auditor.stop()
        if self.consumer is not None:
            self.consumer.join(30)
        if self.backend is not None:
            self.backend.close()
        self.notifier.status(self.status_line())

    def _teardown(self) -> None:
        """Flush everything: stop taking requests, drain the backend, close the log."""
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.auditor is not None:
            self.auditor.stop()
        if self.consumer is not None:
            self.consumer.join(60)
        lost = None
        if self.backend is not None:
            if self.suspended is None:
                lost = self.backend.lost()
                self.backend.close()
        if self.writer is not None:
            if lost is not None:
                self.writer.write_lost(lost)
            self.writer.close()
            self.writer = None
        self.notifier.close()

    # -- reload, rotate, rules -------------------------------------------------------
    def reload(self) -> bool:
        """SIGHUP: re-read the configuration and rules.d.  Both are read completely
        first; any error and nothing changes (the error names file and line)."""
        assert self.cfg is not None and self.auditor is not None
        auditor = self.auditor
        self.notifier.reloading()
        try:
            try:
                new_cfg = config_mod.load(self.config_path)
            except ConfigError as exc:
                self.log.error("reload refused: bad configuration, nothing changed",
                               error=str(exc))
                return False
            rules = None
            if self.suspended is None:
                try:
                    rules = load_rules(new_cfg.rules_dir)
                except RuleError as exc:
                    self.log.error("reload refused: bad rules, previous rules stay",
                                   error=str(exc))
                    return False
            if rules is not None and self._change(lambda: auditor.replace_rules(rules),
                                                  "reload"):
                return False
            kept = {}
            for key in RESTART_KEYS:
                if getattr(new_cfg, key) != getattr(self.cfg, key):
                    self.log.warning("setting changes only at restart", key=key,
                                     running=getattr(self.cfg, key),
                                     configured=getattr(new_cfg, key))
                    kept[key] = getattr(self.cfg, key)
            self.cfg = dataclasses.replace(new_cfg, **kept)
            setter = getattr(self.writer, "configure", None)
            if setter is not None:
                setter(**writer_options(self.cfg))
            self.log.info("reloaded", rules=len(auditor.rules),
                          digest=auditor.rules.digest())
            return True
        finally:
            self.reloads += 1
            self.notifier.ready(self.status_line())

    def _change(self, fn, reason: str) -> str | None:
        """Run a rule change on the consumer thread and log the rules now in force;
        None on success, else the error."""
        assert self.auditor is not None
        auditor = self.auditor

        def on_loop() -> Any:
            result = fn()
            self._record_rules(auditor.rules, reason)
            return result
        with self._lock:
            try:
                auditor.call(on_loop, timeout=60)
            except RuleError as exc:
                self.log.error("rule change refused", reason=reason, error=str(exc))
                return str(exc)
            except Exception as exc:  # backend refused (limits, vanished paths)
                self.log.error("rule change failed", reason=reason, error=str(exc))
                return str(exc)
        return None

    def _record_rules(self, rules: RuleSet, reason: str) -> None:
        """A rules record now, and the header of every later file (after a rotation)
        names the rules then in force, so each file can be read on its own."""
        if self.writer is not None:
            texts, digest = rules.texts(), rules.digest()
            self.writer.write_rules(texts, digest, reason=reason)
            self.writer.header = {**self.writer.header, "rules": texts,
                                  "rules_digest": digest}

    def rotate(self) -> tuple[bool, str | None]:
        """(done, the newest rotated file; None with rotate_count = 0)."""
        if self.writer is None:
            return False, None
        try:
            path = self.writer.rotate()
        except OSError as exc:
            self.log.error("rotation failed", error=exc.strerror or str(exc))
            return False, None
        self.log.info("log rotated", file=path)
        return True, path

    # -- control requests (control thread) --------------------------------------------
    def handle_request(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "status":
            return {"ok": True, "status": self.status()}
        if op == "list":
            assert self.auditor is not None
            return {"ok": True, "rules": self.auditor.rules.texts()}
        if op == "rotate":
            done, path = self.rotate()
            if not done:
                return {"ok": False, "error": "rotation failed (see the daemon's log)"}
            return {"ok": True, "file": path}
        if op in ("add", "delete", "delete-all"):
            if self.suspended is not None:
                return {"ok": False, "error": f"auditing stopped: {self.suspended}"}
            if op == "delete-all":
                cmd = rules_mod.Command("delete-all")
            else:
                text = req.get("rule")
                if not isinstance(text, str):
                    return {"ok": False, "usage": True, "error": "missing rule text"}
                try:
                    cmd = rules_mod.parse_line(text, "<control>")
                except RuleError as exc:
                    return {"ok": False, "usage": True, "error": exc.reason}
                if cmd is None or cmd.action not in ("add", "delete"):
                    return {"ok": False, "usage": True, "error": "not a rule to add or "
                            "delete: use -w/-a or -W/-d"}
                if cmd.action != op:
                    cmd = rules_mod.Command(op, cmd.rule, cmd.source, cmd.line)
            assert self.auditor is not None
            auditor = self.auditor
            error = self._change(lambda: auditor.apply([cmd]), op)
            if error is not None:
                return {"ok": False, "error": error}
            self.log.info("rules changed", op=op, rule=cmd.rule.text() if cmd.rule else None,
                          rules=len(auditor.rules))
            return {"ok": True, "rules": auditor.rules.texts()}
        if op in ("add-pid", "remove-pid"):
            return self._process_request(op, req)
        return {"ok": False, "usage": True, "error": f"unknown op {op!r}"}

    def _process_request(self, op: str, req: dict[str, Any]) -> dict[str, Any]:
        """Add a process (and what it starts) to the running audit, or take it out:
        everything it touches is reported besides the rules, with its key."""
        pid = req.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return {"ok": False, "usage": True, "error": "a pid is needed"}
        if self.suspended is not None:
            return {"ok": False, "error": f"auditing stopped: {self.suspended}"}
        assert self.auditor is not None and self.backend is not None
        backend = self.backend
        if op == "add-pid":
            key = req.get("key") or f"pid-{pid}"
            change = lambda: backend.add_process(pid, children=bool(req.get("children", True)),
                                                 exclusive=False, key=key)
        else:
            change = lambda: backend.remove_process(pid)
        try:
            self.auditor.call(change)
        except (BackendUnavailable, RuleError) as exc:
            return {"ok": False, "error": str(exc)}
        self.log.info("process audit changed", op=op, pid=pid)
        return {"ok": True, "pids": sorted(getattr(backend, "audited", ()))}

    # -- status ----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        assert self.cfg is not None
        out: dict[str, Any] = {"pid": os.getpid(), "state": "running"
                               if self.suspended is None else "stopped: " + self.suspended}
        if self.backend is not None:
            out["backend"] = self.backend.name
        if self.auditor is not None:
            out["rules"] = len(self.auditor.rules)
            out["rules_digest"] = self.auditor.rules.digest()
            out["events"] = self.auditor.events
            # as of the consumer's last poll (the backend is read on that thread only)
            out["events_lost"] = dict(self.auditor.last_lost)
        stats = getattr(self.writer, "stats", None)
        if callable(stats):
            out.update(stats())
        if self.write_errors:
            out["write_errors"] = self.write_errors
        out["log_dir"] = self.cfg.log_dir
        out["config"] = self.config_path or config_mod.DEFAULT_PATH
        out["reloads"] = self.reloads
        out["uptime"] = round(time.time() - self.started, 1)
        return out

    def status_line(self) -> str:
        st = self.status()
        lost = sum(st.get("events_lost", {}).values())
        text = (f"{st.get('backend', '?')}: {st.get('rules', 0)} rules, "
                f"{st.get('events', 0)} events, {lost} lost")
        if st.get("records_dropped"):
            text += f", {st['records_dropped']} log records not written"
        if self.suspended:
            text += f"; AUDITING STOPPED: {self.suspended}"
        return text


def check(config_path: str | None) -> int:
    """--check: validate the configuration and rules.d as a start or reload would
    (for an ExecStartPre, or before `systemctl reload`), without starting anything."""
    try:
        cfg = config_mod.load(config_path)
        rules = load_rules(cfg.rules_dir)
    except (ConfigError, RuleError) as exc:
        print(f"fswatchaudit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"configuration ok: {len(rules)} rules from {cfg.rules_dir}, digest "
          f"{rules.digest()}, log {cfg.log_path}, backend {cfg.backend}")
    return EXIT_OK


def cmd_daemon(args: argparse.Namespace) -> int:
    if args.check:
        return check(args.config)
    if os.geteuid() != 0:
        print("fswatchaudit: the daemon must run as root", file=sys.stderr)
        return EXIT_USAGE
    return Daemon(args.config).run()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "daemon", help="run as a service: rules.d, msgpack logs, control socket",
        description="Audit the rules of rules.d into rotated msgpack logs until SIGTERM. "
                    "SIGHUP reloads the configuration and rules.d, SIGUSR1 rotates the log. "
                    "Control it with `fswatchaudit ctl`.")
    p.add_argument("--config", default=None, metavar="FILE",
                   help=f"configuration file (default: {config_mod.DEFAULT_PATH} if it "
                        "exists, else the built-in defaults)")
    p.add_argument("--check", action="store_true",
                   help="only validate the configuration and rules.d, then exit "
                        "(0 valid, 2 not)")
    p.set_defaults(func=cmd_daemon)
