"""What the daemon reports about itself: `ctl -s` and the sd_notify STATUS line."""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from . import config as config_mod

if TYPE_CHECKING:
    from .daemon import Daemon


def status(daemon: Daemon) -> dict[str, Any]:
    assert daemon.cfg is not None
    out: dict[str, Any] = {"pid": os.getpid(), "state": "running"
                           if daemon.suspended is None else "stopped: " + daemon.suspended}
    if daemon.backend is not None:
        out["backend"] = daemon.backend.name
        limits = daemon.backend.limits()
        if limits:
            out["not_counted"] = limits      # what this backend cannot see or count
    if daemon.auditor is not None:
        auditor = daemon.auditor
        out["rules"] = len(auditor.rules)
        out["rules_digest"] = auditor.rules.digest()
        out["events"] = auditor.events
        # as of the consumer's last poll (the backend is read on that thread only)
        out["events_lost"] = dict(auditor.last_lost)
        # what waits for the consumer: the part of recent activity a SIGKILL would lose
        out["lag"] = {"seconds_behind": round(auditor.behind, 3),
                      "max_seconds_behind": round(auditor.max_behind, 3), **auditor.backlog}
        sinks = auditor.out.stats()
        log_stats = sinks.pop("log", None)
        if log_stats is not None:
            out.update(log_stats)
        if sinks:
            out["sinks"] = sinks
    out["log_dir"] = daemon.cfg.log_dir
    out["config"] = daemon.config_path or config_mod.DEFAULT_PATH
    out["reloads"] = daemon.reloads
    out["uptime"] = round(time.time() - daemon.started, 1)
    return out


def status_line(daemon: Daemon) -> str:
    st = status(daemon)
    lost = sum(st.get("events_lost", {}).values())
    text = (f"{st.get('backend', '?')}: {st.get('rules', 0)} rules, "
            f"{st.get('events', 0)} events, {lost} lost")
    if st.get("records_dropped"):
        text += f", {st['records_dropped']} log records not written"
    if daemon.suspended:
        text += f"; AUDITING STOPPED: {daemon.suspended}"
    return text
