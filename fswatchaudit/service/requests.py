"""Control requests: one handler per operation of the control protocol (control.py
documents the wire format), run on the control server's threads.  Rule and process
changes are carried out on the consumer thread through the daemon."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import rules as rules_mod
from ..backends.base import BackendUnavailable
from ..rules import RuleError
from .status import status

if TYPE_CHECKING:
    from .daemon import Daemon

Reply = dict[str, Any]


def _usage(message: str) -> Reply:
    return {"ok": False, "usage": True, "error": message}


class RequestHandler:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.handlers: dict[str, Callable[[dict[str, Any]], Reply]] = {
            "status": self.status,
            "list": self.list,
            "rotate": self.rotate,
            "add": self.change_rules,
            "delete": self.change_rules,
            "delete-all": self.change_rules,
            "add-pid": self.change_processes,
            "remove-pid": self.change_processes,
        }

    def handle(self, req: dict[str, Any]) -> Reply:
        op = req.get("op")
        handler = self.handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            return _usage(f"unknown op {op!r}")
        return handler(req)

    def status(self, req: dict[str, Any]) -> Reply:
        return {"ok": True, "status": status(self.daemon)}

    def list(self, req: dict[str, Any]) -> Reply:
        assert self.daemon.auditor is not None
        return {"ok": True, "rules": self.daemon.auditor.rules.texts()}

    def rotate(self, req: dict[str, Any]) -> Reply:
        done, path = self.daemon.rotate()
        if not done:
            return {"ok": False, "error": "rotation failed (see the daemon's log)"}
        return {"ok": True, "file": path}

    def _refused_while_suspended(self) -> Reply | None:
        if self.daemon.suspended is not None:
            return {"ok": False, "error": f"auditing stopped: {self.daemon.suspended}"}
        return None

    def change_rules(self, req: dict[str, Any]) -> Reply:
        op = req["op"]
        refused = self._refused_while_suspended()
        if refused:
            return refused
        if op == "delete-all":
            cmd = rules_mod.Command("delete-all")
        else:
            text = req.get("rule")
            if not isinstance(text, str):
                return _usage("missing rule text")
            try:
                parsed = rules_mod.parse_line(text, "<control>")
            except RuleError as exc:
                return _usage(exc.reason)
            if parsed is None or parsed.action not in ("add", "delete"):
                return _usage("not a rule to add or delete: use -w/-a or -W/-d")
            cmd = parsed
            if cmd.action != op:
                cmd = rules_mod.Command(op, cmd.rule, cmd.source, cmd.line)
        daemon = self.daemon
        auditor = daemon.auditor
        assert auditor is not None
        error = daemon.change(lambda: auditor.apply([cmd], op), op)
        if error is not None:
            return {"ok": False, "error": error}
        daemon.log.info("rules changed", op=op, rule=cmd.rule.text() if cmd.rule else None,
                        rules=len(auditor.rules))
        return {"ok": True, "rules": auditor.rules.texts()}

    def change_processes(self, req: dict[str, Any]) -> Reply:
        """Add a process (and what it starts) to the running audit, or take it out:
        everything it touches is reported besides the rules, with its key."""
        op, pid = req["op"], req.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return _usage("a pid is needed")
        refused = self._refused_while_suspended()
        if refused:
            return refused
        daemon = self.daemon
        assert daemon.auditor is not None and daemon.backend is not None
        backend = daemon.backend
        change: Callable[[], None]
        if op == "add-pid":
            key = req.get("key") or f"pid-{pid}"
            children = bool(req.get("children", True))
            change = lambda: backend.add_process(pid, children=children, exclusive=False,
                                                 key=key)
        else:
            change = lambda: backend.remove_process(pid)
        try:
            daemon.auditor.call(change)
        except (BackendUnavailable, RuleError) as exc:
            return {"ok": False, "error": str(exc)}
        daemon.log.info("process audit changed", op=op, pid=pid)
        return {"ok": True, "pids": sorted(backend.audited_pids())}
