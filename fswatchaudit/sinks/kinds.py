"""The kinds of sink a user can ask for, as data: for each, its settings (with their
parsers and defaults) and how it is built.  The daemon's configuration
(``sink.NAME.SETTING = VALUE``) and `trace --sink KIND[:TARGET]` both read this table.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..units import parse_size
from .base import Sink
from .encode import JsonEncoder
from .queued import DEFAULT_QUEUE, QueuedSink


def _abs_path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError(f"{text!r} is not an absolute path")
    return os.path.normpath(text)


def _count(text: str) -> int:
    n = int(text)
    if n < 1:
        raise ValueError(f"{text!r} must be at least 1")
    return n


@dataclass(frozen=True)
class SinkKind:
    name: str
    build: Callable[[dict[str, Any], SinkContext], Sink]
    settings: dict[str, Callable[[str], Any]]
    defaults: dict[str, Any] = field(default_factory=dict)
    target: str | None = None          # the setting `--sink KIND:TARGET` gives
    needs: tuple[str, ...] = ()        # event fields the backend must report


@dataclass
class SinkContext:
    """What building a sink needs from the run: the header files begin with, and the
    log file settings a file sink inherits."""
    header: dict[str, Any]
    file_options: dict[str, Any] = field(default_factory=dict)


def _jsonl(settings: dict[str, Any], ctx: SinkContext) -> Sink:
    from .rotating import RotatingFileSink
    sink = RotatingFileSink(settings["path"], ctx.header, encoder=JsonEncoder(),
                            **ctx.file_options)
    sink.name = settings["name"]
    return sink


def _auditd(settings: dict[str, Any], ctx: SinkContext) -> Sink:
    from .auditd import AuditdEncoder
    from .rotating import RotatingFileSink
    sink = RotatingFileSink(settings["path"], ctx.header, encoder=AuditdEncoder(),
                            **ctx.file_options)
    sink.name = settings["name"]
    return sink


def _syslog(settings: dict[str, Any], ctx: SinkContext) -> Sink:
    from .syslog import SyslogSink
    return QueuedSink(SyslogSink(settings["address"], settings["facility"],
                                 name=settings["name"]), settings["queue"])


def _journald(settings: dict[str, Any], ctx: SinkContext) -> Sink:
    from .journald import JournaldSink
    return QueuedSink(JournaldSink(settings["socket"], name=settings["name"]),
                      settings["queue"])


DEFAULT_BUNDLE = 256            # records a NATS message holds at most (nats.py)


def _nats(settings: dict[str, Any], ctx: SinkContext) -> Sink:
    from .nats import NatsSink
    return NatsSink([u.strip() for u in settings["servers"].split(",") if u.strip()],
                    host=ctx.header.get("host", ""), boot_id=ctx.header.get("boot_id", ""),
                    start=ctx.header.get("start", 0), spool_dir=settings["spool_dir"],
                    name=settings["name"], prefix=settings["prefix"],
                    stream=settings["stream"], create_stream=settings["create_stream"],
                    replicas=settings["replicas"], spool_limit=settings["spool_limit"],
                    queue_size=settings["queue"], bundle=settings["bundle"])


def _yes_no(text: str) -> bool:
    if text.lower() in ("yes", "true", "1"):
        return True
    if text.lower() in ("no", "false", "0"):
        return False
    raise ValueError(f"{text!r}: expected yes or no")


KINDS: dict[str, SinkKind] = {k.name: k for k in (
    SinkKind("jsonl", _jsonl, {"path": _abs_path}, target="path"),
    SinkKind("auditd", _auditd, {"path": _abs_path}, target="path",
             needs=("syscall", "result", "uid", "loginuid")),
    SinkKind("syslog", _syslog, {"address": str, "facility": str, "queue": _count},
             {"address": "unix:/dev/log", "facility": "authpriv", "queue": DEFAULT_QUEUE},
             target="address"),
    SinkKind("journald", _journald, {"socket": _abs_path, "queue": _count},
             {"socket": "/run/systemd/journal/socket", "queue": DEFAULT_QUEUE},
             target="socket"),
    SinkKind("nats", _nats,
             {"servers": str, "stream": str, "prefix": str, "create_stream": _yes_no,
              "replicas": _count, "spool_dir": _abs_path, "spool_limit": parse_size,
              "queue": _count, "bundle": _count},
             {"stream": "FSWATCHAUDIT", "prefix": "fswatchaudit", "create_stream": True,
              "replicas": 1, "spool_dir": "/var/lib/fswatchaudit/spool",
              "spool_limit": 256 << 20, "queue": DEFAULT_QUEUE,
              "bundle": DEFAULT_BUNDLE},
             target="servers"),
)}


def settings_for(kind_name: str, given: dict[str, str], name: str) -> dict[str, Any]:
    """The sink's settings, parsed, with defaults; ValueError naming the problem."""
    kind = KINDS.get(kind_name)
    if kind is None:
        raise ValueError(f"unknown sink kind {kind_name!r}: choose from {', '.join(KINDS)}")
    out: dict[str, Any] = dict(kind.defaults)
    for key, text in given.items():
        parse = kind.settings.get(key)
        if parse is None:
            raise ValueError(f"a {kind_name} sink has no setting {key!r} (it has: "
                             f"{', '.join(kind.settings)})")
        try:
            out[key] = parse(text)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    missing = [key for key in kind.settings if key not in out]
    if missing:
        raise ValueError(f"a {kind_name} sink needs {', '.join(missing)}")
    out["name"] = name
    out["kind"] = kind_name
    return out


def parse_spec(spec: str, index: int) -> dict[str, Any]:
    """`--sink KIND[:TARGET]` -> settings."""
    kind_name, _, target = spec.partition(":")
    kind = KINDS.get(kind_name)
    if kind is None:
        raise ValueError(f"unknown sink kind {kind_name!r}: choose from {', '.join(KINDS)}")
    given = {kind.target: target} if target and kind.target else {}
    return settings_for(kind_name, given, f"{kind_name}-{index}" if index else kind_name)


def build(settings: dict[str, Any], ctx: SinkContext, reported: frozenset[str]) -> Sink:
    """The sink; ValueError when the backend does not report what it needs."""
    kind = KINDS[settings["kind"]]
    lacking = [f for f in kind.needs if f not in reported]
    if lacking:
        raise ValueError(f"the {kind.name} sink needs events with {', '.join(lacking)}, "
                         "which this backend does not report")
    return kind.build(settings, ctx)


__all__ = ["KINDS", "SinkContext", "build", "parse_spec", "settings_for"]
