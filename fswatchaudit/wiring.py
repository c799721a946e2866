"""Assembling the pipeline, the one way `trace`, `run` and the daemon all use:
backend selection and start, the header every log file begins with, the sinks."""
from __future__ import annotations

import socket
import time
from typing import Any

from . import backends, diag
from .auditor import Auditor
from .backends.base import Backend
from .rules import RuleSet
from .sinks.base import Sink


def open_backend(name: str, rules: RuleSet, queue_size: int | None = None,
                 container: Any = None) -> Backend:
    """The backend `name` (or the best usable one for "auto"), started on ``rules``.
    Raises BackendUnavailable or RuleError with a message naming the problem."""
    cls, probes = backends.select(name)
    diag.get_logger("wiring").info("backend selected",
                                   detail=backends.selection_reason(probes))
    backend = cls(rules, queue_size=queue_size)
    if container is not None:
        backend.set_container(container)
    try:
        backend.start()
    except BaseException:
        backend.close()
        raise
    return backend


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def log_header(backend: str, rules: RuleSet, **extra: object) -> dict[str, Any]:
    """What every log file starts with."""
    return {"host": socket.gethostname(), "boot_id": boot_id(), "start": time.time_ns(),
            "backend": backend, "rules_digest": rules.digest(), "rules": rules.texts(),
            **extra}


def make_auditor(backend: Backend, rules: RuleSet, sinks: list[Sink],
                 **options: Any) -> Auditor:
    """The consumer over a started backend, feeding ``sinks``."""
    return Auditor(backend, rules, sinks, **options)
