"""The rule fields (`-F NAME OP VALUE`) as data, one row per field, as audit-userspace's
lib/fieldtab.h.

A row says how the value is read, which operators the field takes, where it can be
evaluated, and what it is: either a *rule part* (``part``: the Rule attribute it sets,
such as the watched path or the permission letters) or a *comparison* (``attr``: the
Event attribute it is compared with, kept in ``Rule.conds``).

Adding a comparison field is one row here, for instance::

    Field("uid", parse_uint, COMPARE, Where.KERNEL | Where.CONSUMER, attr="uid"),

the parser, ``Rule.identity``, ``Rule.text`` and ``Rule.matches`` take it from the
table; a field that is not a plain comparison of an Event attribute gives its own
``compare``.  A backend that can filter in the kernel reads ``where`` and ``conds``.
"""
from __future__ import annotations

import difflib
import enum
import errno
import grp
import operator
import os
import pwd
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import syscalls as tables

if TYPE_CHECKING:
    from ..events import Event
    from .ruleset import Rule


class BadValue(ValueError):
    """A field value that does not parse; the message is complete (the parser adds
    the file and line)."""


class Where(enum.Flag):
    """Where a field can be evaluated."""
    NOWHERE = 0              # checked when parsed, then not kept
    KERNEL = enum.auto()     # a backend can filter on it before the event reaches us
    CONSUMER = enum.auto()   # Rule.matches evaluates it on the Event


BOTH = Where.KERNEL | Where.CONSUMER

# The operators of auditctl, in the order messages list them.
OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
    "<=": operator.le,
    ">=": operator.ge,
    "&": lambda have, want: bool(have & want),
    "&=": lambda have, want: have & want == want,
}
EQ = frozenset({"="})
NE_EQ = frozenset({"=", "!="})
COMPARE = frozenset({"=", "!=", "<", ">", "<=", ">="})
# Longest first: "<=" must not be read as "<" followed by a value "=...".
_OP_TOKENS = sorted(OPERATORS, key=len, reverse=True)
_OP_CHARS = frozenset("".join(OPERATORS) + "!")


def split_field(text: str) -> tuple[str, str, str] | None:
    """Split ``NAME OP VALUE`` (one -F argument) at its operator.

    The name ends where the first operator starts; the operator is the longest one
    there ("<=" rather than "<").  None when there is no operator.
    """
    for i, ch in enumerate(text):
        if ch in _OP_CHARS:
            for op in _OP_TOKENS:
                if text.startswith(op, i):
                    return text[:i], op, text[i + len(op):]
    return None


def operators_text(ops: Iterable[str]) -> str:
    """Operators in the order of OPERATORS, for messages."""
    return " ".join(op for op in OPERATORS if op in set(ops))


def suggest(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'X'?)' for the closest candidate, or ''."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- value parsers ---------------------------------------------------------------------

def absolute_path(value: str, what: str) -> str:
    if not value:
        raise BadValue(f"empty {what}")
    if not os.path.isabs(value):
        raise BadValue(f"{what} {value!r} is relative: rules need absolute paths")
    norm = os.path.normpath(value)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    return norm


def parse_perms(value: str) -> frozenset[str]:
    bad = sorted(set(value) - set(tables.PERM_LETTERS))
    if not value or bad:
        raise BadValue(f"bad permission letters {value!r}: use letters from "
                       f"'{tables.PERM_LETTERS}' (read, write, execute, attribute)")
    return frozenset(value)


def show_perms(perms: frozenset[str]) -> str:
    return "".join(p for p in tables.PERM_LETTERS if p in perms)


def parse_inode(value: str) -> int:
    try:
        inode = int(value, 0)
    except ValueError:
        inode = 0
    if inode <= 0:
        raise BadValue(f"bad inode {value!r}: expected a positive number")
    return inode


def parse_dev(value: str) -> int:
    try:
        major, minor = value.split(":")
        return os.makedev(int(major), int(minor))
    except ValueError:
        raise BadValue(f"bad dev {value!r}: expected MAJOR:MINOR") from None


def show_dev(dev: int) -> str:
    return f"{os.major(dev)}:{os.minor(dev)}"


def parse_arch(value: str) -> str:
    if value not in ("b64", "b32"):
        raise BadValue(f"bad arch {value!r}: expected b64 or b32")
    return value


UNSET = 4294967295          # (u32)-1: a login uid never set, auditctl's "unset"


def parse_id(kind: str) -> Callable[[str], int]:
    """A user or group id as auditctl reads one: a number, ``unset``/``-1``/
    ``4294967295`` (never set), or a user or group name (looked up now)."""
    def parse(value: str) -> int:
        if value in ("unset", "-1"):
            return UNSET
        try:
            number = int(value, 0)
        except ValueError:
            try:
                if kind == "group":
                    return grp.getgrnam(value).gr_gid
                return pwd.getpwnam(value).pw_uid
            except KeyError:
                raise BadValue(f"no {kind} named {value!r} on this host") from None
        if not 0 <= number <= UNSET:
            raise BadValue(f"bad {kind} id {value!r}")
        return number
    return parse


def parse_success(value: str) -> bool:
    text = value.lower()
    if text in ("1", "yes", "true"):
        return True
    if text in ("0", "no", "false"):
        return False
    raise BadValue(f"bad success value {value!r}: expected 1 (succeeded) or 0 (failed)")


def parse_exit(value: str) -> int:
    """An exit value: a number or an errno name, negative as the kernel returns it
    (``-EACCES``, ``-13``; ``EACCES`` alone means the same)."""
    text = value.lstrip("-")
    code = getattr(errno, text, None) if text.isalpha() or "_" in text else None
    if isinstance(code, int):
        return -code
    try:
        return int(value, 0)
    except ValueError:
        raise BadValue(f"bad exit value {value!r}: a number or an errno name "
                       "such as -EACCES") from None


def show_exit(value: int) -> str:
    name = errno.errorcode.get(-value) if value < 0 else None
    return f"-{name}" if name else str(value)


def parse_program(value: str) -> str:
    return absolute_path(value, "exe=")


def parse_c_number(value: str) -> int:
    """A number as strtoul(.., 0) reads it: 0x hex, a leading 0 octal, else decimal."""
    try:
        if len(value) > 1 and value[0] == "0" and value[1] not in "xX":
            return int(value, 8)
        return int(value, 0)
    except ValueError:
        raise BadValue(f"bad number {value!r}") from None


# Where the open flags are among the arguments, by syscall as written in -S.
OPEN_FLAGS_ARG = {"open": 1, "openat": 2, "openat2": 2, "open_by_handle_at": 2}


def _open_flags(n: int) -> Field:
    """aN on the open syscalls: their flags (a1 of open, a2 of openat and
    open_by_handle_at), as the OSPP rules use them (a2&0100: created, a2&01003: opened
    to change).  Other arguments are not reported by any backend."""
    return Field(f"a{n}", parse_c_number, COMPARE | {"&", "&="}, BOTH, attr="open_flags",
                 show=lambda v: f"0{v:o}" if v else "0")


def parse_uint(value: str) -> int:
    """A number as auditctl reads one (decimal, 0x hex, 0 octal), not negative."""
    try:
        number = int(value, 0)
    except ValueError:
        number = -1
    if number < 0:
        raise BadValue(f"bad number {value!r}")
    return number


# -- the table -------------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    """One field of `-F NAME OP VALUE`."""
    name: str
    parse: Callable[[str], Any]          # the text after the operator -> the value
    operators: frozenset[str]            # the operators it accepts
    where: Where                         # where it can be evaluated
    # A comparison: the Event attribute it is compared with (kept in Rule.conds).
    attr: str | None = None
    # Or a rule part: the Rule attribute it sets, the rule kind a target makes, its
    # value in a rule (None: the rule does not use it) and the value not written out.
    part: str | None = None
    kind: str | None = None
    value_of: Callable[[Rule], Any] | None = None
    default: Any = None
    show: Callable[[Any], str] | None = str  # the value as written; None: not written as -F
    # The consumer's evaluation: (rule, event) for a part, (event, op, value) for a
    # comparison (default: OPERATORS[op] on getattr(event, attr); unknown never matches).
    test: Callable[[Rule, Event], bool] | None = None
    compare: Callable[[Event, str, Any], bool] | None = None

    def holds(self, ev: Event, op: str, value: Any) -> bool:
        """Does the event satisfy this comparison field's `OP value`?"""
        if self.compare is not None:
            return self.compare(ev, op, value)
        have = getattr(ev, self.attr or self.name)
        return have is not None and OPERATORS[op](have, value)


def _id(name: str, attr: str, kind: str = "user", where: Where = BOTH) -> Field:
    """A credential compared as a number (uid, auid, gid, ...)."""
    return Field(name, parse_id(kind), COMPARE, where, attr=attr)


def _dev_part(name: str, part_of: Callable[[int], int]) -> Field:
    return Field(name, parse_uint, COMPARE, Where.CONSUMER, attr="dev",
                 compare=lambda ev, op, v: ev.dev is not None
                 and OPERATORS[op](part_of(ev.dev), v))


def _target(name: str) -> Field:
    """path= (one entry) and dir= (a subtree): the rule's target, its kind is the name."""
    return Field(name, lambda v: absolute_path(v, f"{name}="), EQ, BOTH,
                 part="target", kind=name, show=shlex.quote,
                 value_of=lambda r: r.target if r.kind == name else None,
                 test=lambda r, ev: r.covers_path(ev.path) or r.covers_path(ev.path2))


ROWS: tuple[Field, ...] = (
    # The syscall table: b64 the machine's own, b32 the 32-bit one (ia32 on x86_64);
    # two rules that differ only in arch are two rules.  An event whose arch is not
    # told is a native (b64) one.
    Field("arch", parse_arch, EQ, BOTH, attr="arch",
          compare=lambda ev, op, v: (getattr(ev, "arch", None) or "b64") == v),
    _target("path"),
    _target("dir"),
    Field("inode", parse_inode, EQ, BOTH, part="inode", kind="inode",
          value_of=lambda r: r.inode if r.kind == "inode" else None,
          test=lambda r, ev: ev.ino == r.inode),
    Field("dev", parse_dev, EQ, BOTH, part="dev", show=show_dev,
          value_of=lambda r: r.dev if r.kind == "inode" else None,
          test=lambda r, ev: ev.dev == r.dev),
    Field("perm", parse_perms, EQ, BOTH, part="perms", show=show_perms,
          default=frozenset(tables.PERM_LETTERS), value_of=lambda r: r.perms,
          test=lambda r, ev: bool(tables.perms_for(ev.op, ev.access) & r.perms)),
    # Written back as -k; the consumer attaches the keys (RuleSet.select).
    Field("key", str, EQ, Where.CONSUMER, part="key", show=None,
          value_of=lambda r: r.key),
    # Who: compared with what the kernel recorded for the process at the operation.
    _id("auid", "loginuid"),
    _id("loginuid", "loginuid"),
    _id("uid", "uid"),
    _id("euid", "euid"),
    _id("gid", "gid", "group"),
    # Saved and filesystem ids: no backend reports them yet, so a rule with them is
    # refused by every backend (never silently widened).
    _id("suid", "suid", where=Where.KERNEL),
    _id("fsuid", "fsuid", where=Where.KERNEL),
    _id("egid", "egid", "group", where=Where.KERNEL),
    _id("sgid", "sgid", "group", where=Where.KERNEL),
    _id("fsgid", "fsgid", "group", where=Where.KERNEL),
    Field("pid", parse_uint, COMPARE, BOTH, attr="pid"),
    Field("ppid", parse_uint, COMPARE, BOTH, attr="ppid"),
    Field("exe", parse_program, NE_EQ, Where.CONSUMER, attr="exe", show=shlex.quote),
    Field("comm", str, NE_EQ, Where.CONSUMER, attr="comm", show=shlex.quote),
    # What came of it: success is result == 0; exit is the result itself (-errno).
    Field("success", parse_success, NE_EQ, BOTH, attr="result", show=lambda v: str(int(v)),
          compare=lambda ev, op, v: ev.result is not None
          and OPERATORS[op](ev.result == 0, v)),
    Field("exit", parse_exit, COMPARE, BOTH, attr="result", show=show_exit),
    _dev_part("dev_major", os.major),
    _dev_part("dev_minor", os.minor),
    _open_flags(1),
    _open_flags(2),
)

FIELDS: dict[str, Field] = {row.name: row for row in ROWS}


# -- field comparisons: `-C NAME OP NAME` -------------------------------------------------

@dataclass(frozen=True)
class Comparand:
    """One side of `-C NAME OP NAME`, auditctl's comparison of two fields of one event
    (``-C uid!=euid``, ``-C auid!=obj_uid``): ids of one kind compare, users with users
    and groups with groups.  ``attr`` is the Event attribute (or, for those no event
    carries, the credential a kernel backend reads); ``where`` says where it is known."""
    name: str
    kind: str                           # "user" or "group"
    attr: str
    where: Where


COMPARANDS: dict[str, Comparand] = {c.name: c for c in (
    Comparand("uid", "user", "uid", BOTH),
    Comparand("euid", "user", "euid", BOTH),
    Comparand("suid", "user", "suid", Where.KERNEL),
    Comparand("fsuid", "user", "fsuid", Where.KERNEL),
    Comparand("auid", "user", "loginuid", BOTH),
    Comparand("loginuid", "user", "loginuid", BOTH),
    # the object's owner (the eBPF backend reports it; the others refuse rules with it)
    Comparand("obj_uid", "user", "ouid", Where.CONSUMER),
    Comparand("gid", "group", "gid", BOTH),
    Comparand("egid", "group", "egid", Where.KERNEL),
    Comparand("sgid", "group", "sgid", Where.KERNEL),
    Comparand("fsgid", "group", "fsgid", Where.KERNEL),
    Comparand("obj_gid", "group", "ogid", Where.CONSUMER),
)}
COMPARISON_OPERATORS = NE_EQ


def parse_comparison(text: str) -> tuple[str, str, str]:
    """``NAME OP NAME`` of one -C argument -> (left, op, right)."""
    parts = split_field(text)
    if parts is None:
        raise BadValue(f"bad comparison {text!r}: expected NAME=NAME or NAME!=NAME")
    left, op, right = parts
    for name in (left, right):
        if name not in COMPARANDS:
            raise BadValue(f"-C cannot compare {name!r}{suggest(name, COMPARANDS)} "
                           f"(it compares: {', '.join(COMPARANDS)})")
    if op not in COMPARISON_OPERATORS:
        raise BadValue(f"-C does not take the operator {op!r} (it takes: "
                       f"{operators_text(COMPARISON_OPERATORS)})")
    if COMPARANDS[left].kind != COMPARANDS[right].kind:
        raise BadValue(f"-C {text}: a user id compares only with a user id, a group id "
                       "with a group id")
    if left == right:
        raise BadValue(f"-C {text}: a field compared with itself")
    return left, op, right


def field_names() -> str:
    return ", ".join(FIELDS)


def rule_parts() -> tuple[str, ...]:
    """The Rule attributes fields set, in table order, each once."""
    return tuple(dict.fromkeys(row.part for row in FIELDS.values() if row.part))
