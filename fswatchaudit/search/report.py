"""`report`: summaries of the events a search selects (the aureport of this tool).

``Report.add`` takes each matching event map once; ``data()`` gives the summary as
plain JSON-able data, which the terminal tables, ``--json`` and the HTML page all
render, so the three always say the same thing.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any

from .. import syscalls
from ..names import UNSET_ID, errno_name, user_name
from ..sinks.encode import iso_time

MINUTE = 60 * 1_000_000_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR


def bucket_for(span_ns: int) -> tuple[str, int]:
    """Histogram bucket from the range: minutes up to 3 hours, hours up to 7 days,
    days beyond."""
    if span_ns <= 3 * HOUR:
        return "minute", MINUTE
    if span_ns <= 7 * DAY:
        return "hour", HOUR
    return "day", DAY


def _user(uid: int | None) -> str:
    if uid is None:
        return "-"
    if uid == UNSET_ID:
        return "unset"
    name = user_name(uid)
    return f"{uid} ({name})" if name else str(uid)


class Report:
    def __init__(self, top: int = 15) -> None:
        self.top = top
        self.events = 0
        self.first: int | None = None
        self.last: int | None = None
        self.alias_op: Counter[tuple[str, str]] = Counter()
        self.per_alias: Counter[str] = Counter()
        self.per_key: Counter[str] = Counter()
        self.per_exe: Counter[str] = Counter()
        self.per_user: Counter[tuple[int | None, int | None]] = Counter()
        self.per_container: Counter[str] = Counter()
        self.failed: Counter[tuple[str, str, str, int | None]] = Counter()
        self.failures = 0
        self.paths: Counter[str] = Counter()
        self.times: Counter[int] = Counter()      # per second, bucketed at the end

    def add(self, d: dict[str, Any]) -> None:
        self.events += 1
        t = d.get("time") or 0
        if t:
            if self.first is None or t < self.first:
                self.first = t
            if self.last is None or t > self.last:
                self.last = t
            self.times[t // 1_000_000_000] += 1
        op = d.get("op", "?")
        aliases = d.get("aliases") or ["-"]
        for a in aliases:
            self.alias_op[(a, op)] += 1
            self.per_alias[a] += 1
        for k in d.get("keys") or ["(no key)"]:
            self.per_key[k] += 1
        exe = d.get("exe") or (f"[{d['comm']}]" if d.get("comm") else "(unknown)")
        self.per_exe[exe] += 1
        self.per_user[(d.get("loginuid"), d.get("uid"))] += 1
        c = d.get("container")
        self.per_container[str(c.get("id", "?")) if isinstance(c, dict) else "(host)"] += 1
        path = d.get("path")
        if path is not None:
            self.paths[path] += 1
        if d.get("path2") is not None:
            self.paths[d["path2"]] += 1
        r = d.get("result")
        if r is not None and r < 0:
            self.failures += 1
            self.failed[(errno_name(r), path or "?", exe, d.get("loginuid"))] += 1

    # -- the summary as data ------------------------------------------------------
    def histogram(self) -> dict[str, Any]:
        if self.first is None or self.last is None:
            return {"unit": "minute", "buckets": []}
        unit, size = bucket_for(self.last - self.first)
        size_s = size // 1_000_000_000
        offset = time.localtime(self.first // 1_000_000_000).tm_gmtoff or 0
        counts: Counter[int] = Counter()
        for sec, n in self.times.items():
            counts[(sec + offset) // size_s * size_s - offset] += n
        lo, hi = min(counts), max(counts)
        buckets = []
        b = lo
        while b <= hi:
            buckets.append({"start": b * 1_000_000_000, "label": iso_time(b * 10**9)[:19],
                            "count": counts.get(b, 0)})
            b += size_s
        return {"unit": unit, "buckets": buckets}

    def path_tree(self) -> dict[str, Any]:
        """The top paths and their directories, each with the count of everything
        under it (all paths, not only those shown); single-child chains merged."""
        rolled: Counter[str] = Counter()
        for p, n in self.paths.items():
            parts = p.split("/")
            for i in range(1, len(parts) + 1):
                rolled["/".join(parts[:i]) or "/"] += n
        top = [p for p, _ in self.paths.most_common(self.top)]
        root: dict[str, Any] = {"name": "/", "path": "/", "count": rolled.get("/", 0),
                                "children": {}}
        for p in top:
            node = root
            parts = [x for x in p.split("/") if x]
            for i in range(len(parts)):
                sub = "/" + "/".join(parts[:i + 1])
                child = node["children"].get(parts[i])
                if child is None:
                    child = node["children"][parts[i]] = {
                        "name": parts[i], "path": sub, "count": rolled.get(sub, 0),
                        "own": self.paths.get(sub, 0), "children": {}}
                node = child

        def finish(node: dict[str, Any]) -> dict[str, Any]:
            kids = sorted(node["children"].values(), key=lambda c: (-c["count"], c["name"]))
            # merge a directory into its only child when nothing else is under it
            while (len(kids) == 1 and kids[0]["count"] == node["count"]
                   and node["path"] != "/" and not node.get("own")):
                only = kids[0]
                node = {**only, "name": node["name"] + "/" + only["name"]}
                kids = sorted(node["children"].values(),
                              key=lambda c: (-c["count"], c["name"]))
            return {"name": node["name"], "path": node["path"], "count": node["count"],
                    "children": [finish(k) for k in kids]}
        return finish(root)

    def data(self, scanned: dict[str, Any] | None = None) -> dict[str, Any]:
        top = self.top
        order = {a: i for i, a in enumerate(syscalls.ALIAS_ORDER)}
        alias_rows = sorted(self.alias_op.items(),
                            key=lambda kv: (order.get(kv[0][0], 99), -kv[1], kv[0][1]))
        return {
            "events": self.events,
            "first": self.first, "last": self.last,
            "first_iso": iso_time(self.first or 0), "last_iso": iso_time(self.last or 0),
            "per_alias": [{"alias": a, "count": n} for a, n in
                          sorted(self.per_alias.items(),
                                 key=lambda kv: (order.get(kv[0], 99), kv[0]))],
            "per_alias_op": [{"alias": a, "op": o, "count": n}
                             for (a, o), n in alias_rows],
            "per_key": [{"key": k, "count": n} for k, n in self.per_key.most_common(top)],
            "per_program": [{"exe": e, "count": n} for e, n in self.per_exe.most_common(top)],
            "per_user": [{"loginuid": lu, "loginuser": _user(lu), "uid": u,
                          "user": _user(u), "count": n}
                         for (lu, u), n in self.per_user.most_common(top)],
            "failed": {"count": self.failures,
                       "top": [{"result": r, "path": p, "exe": e, "loginuid": lu,
                                "loginuser": _user(lu), "count": n}
                               for (r, p, e, lu), n in self.failed.most_common(top)]},
            "per_container": [{"container": c, "count": n}
                              for c, n in self.per_container.most_common(top)],
            "paths": [{"path": p, "count": n} for p, n in self.paths.most_common(top)],
            "path_tree": self.path_tree(),
            "histogram": self.histogram(),
            **({"scanned": scanned} if scanned is not None else {}),
        }
