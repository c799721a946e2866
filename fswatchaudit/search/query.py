"""What a search selects, compiled once into one predicate over the raw maps the log
reader gives (no Event is built for a record that does not match).

Values of one filter are alternatives (``--key a --key b``: either key); different
filters must all hold.  A raw map may hold a name as bytes (a name that is not UTF-8
is a msgpack bin value): string filters compare it as the surrogateescape text the
rest of the tool uses.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .. import ops, syscalls
from ..names import errno_of, uid_of

Predicate = Callable[[dict[str, Any]], bool]
ALL_OPS = frozenset(v for k, v in vars(ops).items() if k.isupper() and isinstance(v, str))


def text(value: Any) -> str | None:
    """A raw map's string value as text (bytes: surrogateescape), None if not a name."""
    if type(value) is str:
        return value
    if type(value) is bytes:
        return value.decode("utf-8", "surrogateescape")
    return None


@dataclass
class Query:
    keys: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)       # exact (path or path2)
    under: list[str] = field(default_factory=list)       # the path or anything below it
    globs: list[str] = field(default_factory=list)       # fnmatch: * also crosses /
    ops: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    ppids: list[int] = field(default_factory=list)
    uids: list[int] = field(default_factory=list)
    euids: list[int] = field(default_factory=list)
    loginuids: list[int] = field(default_factory=list)
    comms: list[str] = field(default_factory=list)
    exes: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)     # success, failure, EACCES, -13
    containers: list[str] = field(default_factory=list)  # id (or a prefix of it)
    since: int | None = None                             # ns since the epoch, inclusive
    until: int | None = None                             # inclusive

    def empty(self) -> bool:
        return not any((self.keys, self.paths, self.under, self.globs, self.ops,
                        self.aliases, self.pids, self.ppids, self.uids, self.euids,
                        self.loginuids, self.comms, self.exes, self.results,
                        self.containers)) and self.since is None and self.until is None


def check_query(q: Query) -> None:
    """ValueError for values no event can hold (a typo must not silently match nothing)."""
    for op in q.ops:
        if op not in ALL_OPS:
            raise ValueError(f"unknown operation: {op} (one of {', '.join(sorted(ALL_OPS))})")
    for alias in q.aliases:
        if alias not in syscalls.ALIAS_ORDER:
            raise ValueError(f"unknown alias: {alias} (one of "
                             f"{', '.join(syscalls.ALIAS_ORDER)})")
    for r in q.results:
        if r.lower() not in ("success", "failure"):
            errno_of(r)
    if q.since is not None and q.until is not None and q.since > q.until:
        raise ValueError("--since is after --until")


def _names(values: list[str]) -> tuple[frozenset[str], frozenset[bytes]]:
    return (frozenset(values),
            frozenset(v.encode("utf-8", "surrogateescape") for v in values))


def _equals(key: str, values: list[str]) -> Predicate:
    as_str, as_bytes = _names(values)

    def check(d: dict[str, Any]) -> bool:
        v = d.get(key)
        return v in as_str or v in as_bytes
    return check


def _ints(key: str, values: list[int]) -> Predicate:
    wanted = frozenset(values)
    return lambda d: d.get(key) in wanted


def _any_in_list(key: str, values: list[str]) -> Predicate:
    as_str, as_bytes = _names(values)

    def check(d: dict[str, Any]) -> bool:
        for v in d.get(key) or ():
            if v in as_str or v in as_bytes:
                return True
        return False
    return check


def _path_match(match: Callable[[str], bool]) -> Predicate:
    def check(d: dict[str, Any]) -> bool:
        for k in ("path", "path2"):
            v = d.get(k)
            if v is None:
                continue
            s = v if type(v) is str else text(v)
            if s is not None and match(s):
                return True
        return False
    return check


def _result(values: list[str]) -> Predicate:
    success = failure = False
    codes: set[int] = set()
    for r in values:
        low = r.lower()
        if low == "success":
            success = True
        elif low == "failure":
            failure = True
        else:
            codes.add(errno_of(r))

    def check(d: dict[str, Any]) -> bool:
        # an event without a result (fanotify, inotify: they report only what
        # happened) is a success
        r = d.get("result") or 0
        return (success and r == 0) or (failure and r < 0) or r in codes
    return check


def _container(values: list[str]) -> Predicate:
    def check(d: dict[str, Any]) -> bool:
        c = d.get("container")
        if not isinstance(c, dict):
            return False
        cid = text(c.get("id")) or ""
        return any(cid == v or (len(v) >= 4 and cid.startswith(v)) for v in values)
    return check


def compile_query(q: Query) -> Predicate:
    """One predicate over an event's raw map; the kind and time range are checked by
    the scanner before it (cheapest first).  Checks run cheapest and most selective
    first: numbers, then exact names, then lists, then path matching."""
    checks: list[Predicate] = []
    for key, values in (("pid", q.pids), ("ppid", q.ppids), ("uid", q.uids),
                        ("euid", q.euids), ("loginuid", q.loginuids)):
        if values:
            checks.append(_ints(key, values))
    if q.ops:
        checks.append(_equals("op", q.ops))
    if q.comms:
        checks.append(_equals("comm", q.comms))
    if q.exes:
        checks.append(_equals("exe", q.exes))
    if q.results:
        checks.append(_result(q.results))
    if q.aliases:
        checks.append(_any_in_list("aliases", q.aliases))
    if q.keys:
        checks.append(_any_in_list("keys", q.keys))
    if q.containers:
        checks.append(_container(q.containers))
    if q.paths or q.under or q.globs:
        exact = frozenset(q.paths)
        prefixes = tuple(p.rstrip("/") + "/" for p in q.under)
        bases = frozenset(p.rstrip("/") or "/" for p in q.under)
        glob_re = (re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in q.globs))
                   if q.globs else None)

        def match(s: str) -> bool:
            return (s in exact or s in bases or (bool(prefixes) and s.startswith(prefixes))
                    or (glob_re is not None and glob_re.match(s) is not None))
        checks.append(_path_match(match))
    if not checks:
        return lambda d: True
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        a, b = checks
        return lambda d: a(d) and b(d)
    chain = tuple(checks)

    def all_of(d: dict[str, Any]) -> bool:
        for c in chain:
            if not c(d):
                return False
        return True
    return all_of


def _packed(value: str) -> bytes:
    """A name as the log stores it: a msgpack str, or a bin when it is not UTF-8."""
    try:
        return msgpack.packb(value.encode("utf-8"), use_bin_type=False)
    except UnicodeEncodeError:
        return msgpack.packb(value.encode("utf-8", "surrogateescape"), use_bin_type=True)


def needles(q: Query) -> tuple[bytes, ...]:
    """Byte strings one of which every event the query selects holds in its record
    (the values of one filter whose alternatives are all literal), for a pre-check on
    raw bytes; () when there is none."""
    if (q.paths or q.under) and not q.globs:
        return (tuple(_packed(p) for p in q.paths)
                + tuple(p.encode("utf-8", "surrogateescape") for p in q.under))
    for values in (q.exes, q.keys, q.comms):
        if values:
            return tuple(_packed(v) for v in values)
    return ()


def uids(values: list[str]) -> list[int]:
    """Command-line uids: numbers, user names, ``unset``; comma-separated or repeated."""
    return [uid_of(v) for item in values for v in item.split(",") if v]


def split(values: list[str]) -> list[str]:
    """Comma-separated or repeated values."""
    return [v for item in values for v in item.split(",") if v]
