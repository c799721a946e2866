"""Service mode: ``fswatchaudit daemon``.

Threads and who does what:
  consumer   Auditor.run(): reads the backend, sends the record stream into the sinks;
             rule changes run here (Auditor.call), so the backend and the sinks see one
             caller.
  control    the control socket (control.py); requests are dispatched by requests.py.
  main       supervision: signals arrive as bytes on a wakeup pipe (the handlers only
             set flags), and reload, rotation, disk checks, sd_notify STATUS and
             shutdown are done from here.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import select
import signal
import stat
import sys
import threading
import time
from typing import Any

from .. import backends, diag
from .. import rules as rules_mod
from ..auditor import Auditor
from ..backends.base import BackendUnavailable
from ..errors import EXIT_FAILURE, EXIT_NO_BACKEND, EXIT_OK, EXIT_USAGE
from ..events import Marker
from ..rules import RuleError, RuleSet
from ..sinks import RotatingFileSink, Sink
from ..wiring import check_targets, log_header, open_backend
from . import config as config_mod
from .config import Config, ConfigError
from .control import ControlServer
from .requests import RequestHandler
from .sdnotify import Notifier
from .status import status_line

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)

# Settings a reload cannot change in a running daemon.
RESTART_KEYS = ("backend", "ring_buffer_size", "log_dir", "log_file", "control_socket",
                "sinks", "chain", "seal_key_file", "seal_interval")


def load_rules(rules_dir: str) -> RuleSet:
    """The rules of rules_dir/*.rules, all or nothing; a missing directory is no rules."""
    if not os.path.isdir(rules_dir):
        raise RuleError("rules directory does not exist", rules_dir)
    cmds = rules_mod.read_files([rules_dir])
    rules = RuleSet()
    rules.apply(cmds)
    check_targets(rules)
    log = diag.get_logger("daemon")
    for cmd in cmds:
        if cmd.note:
            log.info("rules file setting has no effect", where=f"{cmd.source}:{cmd.line}",
                     note=cmd.note)
    return rules


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


def configured_sinks(cfg: Config, backend: str, header: dict[str, Any]) -> list[Sink]:
    """The sinks of the configuration's sink.NAME.* blocks, besides the msgpack log."""
    from ..capabilities import CAPABILITIES
    from ..sinks import kinds
    ctx = kinds.SinkContext(header, writer_options(cfg))
    out: list[Sink] = []
    try:
        for settings in cfg.sinks:
            try:
                out.append(kinds.build(settings, ctx, CAPABILITIES[backend].fields))
            except ValueError as exc:
                raise ValueError(f"sink {settings['name']}: {exc}") from None
    except BaseException:
        for sink in out:
            sink.close()
        raise
    return out


def writer_options(cfg: Config) -> dict[str, Any]:
    """LogWriter keyword arguments for a configuration."""
    return {"flush_interval": cfg.flush_interval, "fsync": cfg.fsync,
            "rotate_size": cfg.rotate_size, "rotate_count": cfg.rotate_count,
            "disk_full": cfg.disk_full_action, "space_left": cfg.space_left}


class Daemon:
    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self.log = diag.get_logger("daemon")
        self.notifier = Notifier()
        self.cfg: Config | None = None
        self.backend: backends.Backend | None = None
        self.log_sink: RotatingFileSink | None = None
        self.auditor: Auditor | None = None
        self.control: ControlServer | None = None
        self.consumer: threading.Thread | None = None
        self.consumer_error: BaseException | None = None
        self.started = time.time()
        self.reloads = 0
        self.requests = RequestHandler(self)
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
            self.backend = open_backend(cfg.backend, rules, queue_size=cfg.ring_buffer_size)
        except BackendUnavailable as exc:
            print(f"fswatchaudit: {exc}", file=sys.stderr)
            return EXIT_NO_BACKEND
        except RuleError as exc:
            print(f"fswatchaudit: {exc}", file=sys.stderr)
            return EXIT_USAGE
        try:
            chain = None
            if cfg.chain:
                from ..sinks.integrity import Chain
                chain = Chain(cfg.seal_key_file or None, cfg.seal_interval)
            self.log_sink = RotatingFileSink(
                cfg.log_path, log_header(self.backend.name, rules, daemon=True),
                integrity=chain, **writer_options(cfg))
        except OSError as exc:
            print(f"fswatchaudit: cannot write the log {cfg.log_path}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            self._teardown()
            return EXIT_FAILURE
        sinks: list[Sink] = [self.log_sink]
        try:
            sinks += configured_sinks(cfg, self.backend.name,
                                      log_header(self.backend.name, rules, daemon=True))
        except (ValueError, OSError) as exc:
            print(f"fswatchaudit: {exc}", file=sys.stderr)
            self._teardown()
            return EXIT_USAGE if isinstance(exc, ValueError) else EXIT_FAILURE
        # the remote sinks also get the chain head after each write of the log
        self.log_sink.heads_to = [s for s in sinks[1:] if not isinstance(s, RotatingFileSink)]
        self.auditor = Auditor(self.backend, rules, sinks, on_sink_error=self._sink_failed)
        self.auditor.emit(self.auditor.rules_in_force("start"))
        try:
            self.control = ControlServer(cfg.control_socket, self.requests.handle)
        except OSError as exc:
            print(f"fswatchaudit: cannot use the control socket {cfg.control_socket}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            self._teardown()
            return EXIT_FAILURE
        self._start_consumer()
        self.control.start()
        self.log.info("auditing", backend=self.backend.name, rules=len(rules),
                      log=cfg.log_path, socket=cfg.control_socket)
        self.notifier.ready(status_line(self))
        return self._supervise(wake_r)

    def _sink_failed(self, sink: Sink, exc: Exception, count: int) -> None:
        """A sink write that fails is counted (in its stats) and reported, never the end
        of the consumer (the file sink itself carries out the disk-full policy)."""
        if count == 1 or count % 10000 == 0:
            self.log.error("LOG WRITE FAILED", sink=sink.name, error=str(exc), failures=count)

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
                self._safely(lambda: self.notifier.status(status_line(self)), "status")
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
        if self.suspended is None and self.log_sink is not None and self.log_sink.stopped:
            self.suspend(self.log_sink.stop_reason or "log disk full")

    def suspend(self, reason: str) -> None:
        """Stop auditing but keep answering status, so the cause can be seen."""
        self.suspended = reason
        self.log.error("AUDITING STOPPED", reason=reason,
                       action=self.cfg.disk_full_action if self.cfg else None)
        if self.auditor is not None:
            self.auditor.stop()
        if self.consumer is not None:
            self.consumer.join(30)
        if self.auditor is not None:
            counts = self.auditor.finish()
            # the other sinks learn why the stream ends here (the log cannot be written)
            self.auditor.emit(Marker("suspend", {"reason": reason,
                                                 "lost": sum(counts.values())}))
        if self.backend is not None:
            self.backend.close()
        self.notifier.status(status_line(self))

    def _teardown(self) -> None:
        """Flush everything: stop taking requests, drain the backend, close the log."""
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.auditor is not None:
            self.auditor.stop()
        if self.consumer is not None:
            self.consumer.join(60)
        if self.auditor is not None:
            if self.suspended is None:      # a suspended audit has closed its backend
                self.auditor.finish()
                self.auditor.close()
            else:
                self.auditor.out.close()
        else:
            if self.backend is not None:
                self.backend.close()
            if self.log_sink is not None:
                self.log_sink.close()
        self.log_sink = None
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
            if rules is not None and self.change(
                    lambda: auditor.replace_rules(rules, "reload"), "reload"):
                return False
            kept = {}
            for key in RESTART_KEYS:
                if getattr(new_cfg, key) != getattr(self.cfg, key):
                    self.log.warning("setting changes only at restart", key=key,
                                     running=getattr(self.cfg, key),
                                     configured=getattr(new_cfg, key))
                    kept[key] = getattr(self.cfg, key)
            self.cfg = dataclasses.replace(new_cfg, **kept)
            if self.log_sink is not None:
                self.log_sink.configure(**writer_options(self.cfg))
            self.log.info("reloaded", rules=len(auditor.rules),
                          digest=auditor.rules.digest())
            return True
        finally:
            self.reloads += 1
            self.notifier.ready(status_line(self))

    def change(self, fn: Any, reason: str) -> str | None:
        """Run a rule change on the consumer thread (the auditor records the rules now
        in force in the stream); None on success, else the error."""
        assert self.auditor is not None
        with self._lock:
            try:
                self.auditor.call(fn, timeout=60)
            except RuleError as exc:
                self.log.error("rule change refused", reason=reason, error=str(exc))
                return str(exc)
            except Exception as exc:  # backend refused (limits, vanished paths)
                self.log.error("rule change failed", reason=reason, error=str(exc))
                return str(exc)
        return None

    def rotate(self) -> tuple[bool, str | None]:
        """(done, the newest rotated file; None with rotate_count = 0)."""
        if self.log_sink is None:
            return False, None
        try:
            path = self.log_sink.rotate()
        except OSError as exc:
            self.log.error("rotation failed", error=exc.strerror or str(exc))
            return False, None
        self.log.info("log rotated", file=path)
        return True, path

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
