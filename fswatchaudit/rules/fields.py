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
import operator
import os
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


def _target(name: str) -> Field:
    """path= (one entry) and dir= (a subtree): the rule's target, its kind is the name."""
    return Field(name, lambda v: absolute_path(v, f"{name}="), EQ, BOTH,
                 part="target", kind=name, show=shlex.quote,
                 value_of=lambda r: r.target if r.kind == name else None,
                 test=lambda r, ev: r.covers_path(ev.path) or r.covers_path(ev.path2))


ROWS: tuple[Field, ...] = (
    # Accepted for auditctl compatibility and checked; the syscall tables are the
    # 64-bit ones, so every rule is written back as arch=b64.
    Field("arch", parse_arch, EQ, Where.NOWHERE, value_of=lambda r: "b64"),
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
)

FIELDS: dict[str, Field] = {row.name: row for row in ROWS}


def field_names() -> str:
    return ", ".join(FIELDS)


def rule_parts() -> tuple[str, ...]:
    """The Rule attributes fields set, in table order, each once."""
    return tuple(dict.fromkeys(row.part for row in FIELDS.values() if row.part))
