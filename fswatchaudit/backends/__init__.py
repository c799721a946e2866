"""Backends and the selector that picks the best one this host allows, and says why."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from .base import Backend, BackendUnavailable

# Best first.  Modules are imported lazily: the eBPF one needs bcc.
BACKENDS: dict[str, str] = {
    "ebpf": "fswatchaudit.backends.ebpf:EbpfBackend",
    "fanotify": "fswatchaudit.backends.fanotify:FanotifyBackend",
    "inotify": "fswatchaudit.backends.inotify:InotifyBackend",
}


@dataclass
class Probe:
    name: str
    usable: bool
    reason: str


def backend_class(name: str) -> type[Backend]:
    module, _, attr = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def probe(name: str) -> Probe:
    """Ask one backend whether it can run here; an import failure is a reason too."""
    try:
        cls = backend_class(name)
    except ImportError as exc:
        return Probe(name, False, f"cannot import: {exc}")
    try:
        usable, reason = cls.probe()
    except Exception as exc:  # a probe must never take the selector down
        return Probe(name, False, f"probe failed: {exc}")
    return Probe(name, usable, reason)


def probe_all() -> list[Probe]:
    return [probe(name) for name in BACKENDS]


def select(name: str = "auto") -> tuple[type[Backend], list[Probe]]:
    """The backend class to use and the probes that led to it.

    With a name, that backend or BackendUnavailable; with "auto", the first usable one
    in the order eBPF, fanotify, inotify.
    """
    if name != "auto":
        if name not in BACKENDS:
            raise BackendUnavailable(f"unknown backend {name!r}: choose from "
                                     f"auto, {', '.join(BACKENDS)}")
        p = probe(name)
        if not p.usable:
            raise BackendUnavailable(f"backend {name} is not usable here: {p.reason}")
        return backend_class(name), [p]
    probes: list[Probe] = []
    for candidate in BACKENDS:
        p = probe(candidate)
        probes.append(p)
        if p.usable:
            return backend_class(candidate), probes
    raise BackendUnavailable("no backend is usable here: " +
                             "; ".join(f"{p.name}: {p.reason}" for p in probes))


def selection_reason(probes: list[Probe]) -> str:
    """One line: which backend was chosen and why the better ones were not."""
    chosen = probes[-1]
    skipped = [f"{p.name} not usable ({p.reason})" for p in probes[:-1]]
    text = f"using {chosen.name}: {chosen.reason}"
    return text + ("; " + "; ".join(skipped) if skipped else "")


__all__ = ["Backend", "BackendUnavailable", "BACKENDS", "Probe", "probe", "probe_all",
           "select", "selection_reason", "backend_class"]
