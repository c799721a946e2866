"""Assembling the pipeline, the one way `trace`, `run` and the daemon all use:
backend selection and start, the header every log file begins with, the sinks."""
from __future__ import annotations

import os
import socket
import time
from typing import Any

from . import backends, diag
from .backends.base import Backend
from .rules import RuleError, RuleSet


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
        backend.refuse_unhonoured(rules)
        backend.start()
    except BaseException:
        backend.close()
        raise
    return backend


def check_targets(rules: RuleSet, root: str = "/") -> None:
    """Refuse rules whose object cannot be watched now, with the message a start would
    give: a directory rule needs its directory, a path rule the directory it is in (the
    file itself may come later).  The daemon's start, reload and --check all ask this,
    so --check gives the verdict a start gives."""
    for rule in rules:
        if rule.target is None:
            continue
        need = rule.target if rule.kind == "dir" else os.path.dirname(rule.target) or "/"
        if not os.path.isdir(os.path.join(root, need.lstrip("/"))):
            what = "it" if need == rule.target else f"its directory {need}"
            raise RuleError(f"cannot watch {rule.target}: {what} does not exist "
                            "(or is not a directory)")


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

