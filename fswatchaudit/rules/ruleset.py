"""Rules and the rule set in force: what a rule is, how it is written back, which
events it selects, and the one decision on whether an event is reported."""
from __future__ import annotations

import hashlib
import shlex
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import syscalls as tables
from ..errors import LocatedError
from ..events import Event
from .fields import COMPARANDS, FIELDS, OPERATORS, Field, Where, rule_parts

# The rule parts that name the watched object (the rest: operation, permission class,
# syscalls, comparisons).
OBJECT_PARTS = frozenset({"target", "inode", "dev"})


class RuleError(LocatedError):
    """A rule that cannot be applied; the message names the problem and where it is."""


@dataclass(frozen=True)
class Cond:
    """A comparison field of a rule: `-F NAME OP VALUE` (see fields.Field.attr)."""
    name: str
    op: str
    value: Any


_CONSUMER_ROWS: tuple[Field, ...] = ()


def _consumer_rows() -> tuple[Field, ...]:
    """The field table's rows the consumer evaluates (the table is data: read once)."""
    global _CONSUMER_ROWS
    if not _CONSUMER_ROWS:
        _CONSUMER_ROWS = tuple(row for row in FIELDS.values() if row.where & Where.CONSUMER)
    return _CONSUMER_ROWS


@dataclass(frozen=True)
class Compare:
    """A field comparison of a rule: `-C LEFT OP RIGHT` (see fields.COMPARANDS)."""
    left: str
    op: str
    right: str

    def text(self) -> str:
        return f"{self.left}{self.op}{self.right}"

    @property
    def in_consumer(self) -> bool:
        """Can the consumer evaluate it (both sides are on every event)?"""
        return all(COMPARANDS[n].where & Where.CONSUMER for n in (self.left, self.right))

    def holds(self, ev: Event) -> bool:
        left = getattr(ev, COMPARANDS[self.left].attr)
        right = getattr(ev, COMPARANDS[self.right].attr)
        return left is not None and right is not None and OPERATORS[self.op](left, right)


@dataclass(frozen=True)
class Rule:
    """One watch.  kind is "path" (one file or entry), "dir" (subtree) or "inode"."""
    kind: str
    target: str | None = None
    inode: int | None = None
    dev: int | None = None
    perms: frozenset[str] = frozenset(tables.PERM_LETTERS)
    syscalls: frozenset[str] = frozenset()   # empty: any syscall
    ops: frozenset[str] = tables.ALL_OPS
    key: str | None = None
    syscall_names: tuple[str, ...] = ()      # as written, for the normalised text
    from_watch: bool = False                 # written as -w
    conds: tuple[Cond, ...] = ()             # comparison fields, in table order
    compares: tuple[Compare, ...] = ()       # -C field comparisons, as written
    # What Rule.matches evaluates, from the field table (not part of the rule's value):
    # (is it a test of the rule's object, the test).
    _tests: tuple[tuple[bool, Callable[[Rule, Event], bool]], ...] = field(
        init=False, repr=False, compare=False, default=())
    _conds: tuple[tuple[Field, Cond], ...] = field(init=False, repr=False, compare=False,
                                                   default=())
    _text: str | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        tests: list[tuple[bool, Callable[[Rule, Event], bool]]] = []
        conds: list[tuple[Field, Cond]] = []
        for row in _consumer_rows():
            if row.part is not None:
                if row.test is not None and row.value_of is not None \
                        and row.value_of(self) is not None:
                    tests.append((row.part in OBJECT_PARTS, row.test))
            else:
                conds += [(row, c) for c in self.conds if c.name == row.name]
        object.__setattr__(self, "_tests", tuple(tests))
        object.__setattr__(self, "_conds", tuple(conds))

    def identity(self) -> tuple:
        """What makes two rules the same rule (for duplicates and -d)."""
        return (self.kind, *(getattr(self, part) for part in rule_parts()), self.ops,
                self.syscalls, self.conds, self.compares)

    def field_texts(self) -> list[str]:
        """The -F arguments of this rule, in table order."""
        out: list[str] = []
        for row in FIELDS.values():
            if row.show is None:
                continue
            if row.part is None and row.attr is not None:
                out += [f"{c.name}{c.op}{row.show(c.value)}"
                        for c in self.conds if c.name == row.name]
                continue
            value = row.value_of(self) if row.value_of is not None else None
            if value is not None and value != row.default:
                out.append(f"{row.name}={row.show(value)}")
        return out

    def text(self) -> str:
        """The normalised rule, in the form `rules check` prints and -l lists (worked
        out once: a rule never changes)."""
        text = self._text
        if text is None:
            text = self._make_text()
            object.__setattr__(self, "_text", text)
        return text

    def _make_text(self) -> str:
        if self.from_watch:
            out = ["-w", shlex.quote(self.target or "")]
            if self.perms != FIELDS["perm"].default:
                out += ["-p", "".join(p for p in tables.PERM_LETTERS if p in self.perms)]
        else:
            out = ["-a", "always,exit"]
            for f in self.field_texts():
                out += ["-F", f]
            for c in self.compares:
                out += ["-C", c.text()]
            if self.syscall_names:
                out += ["-S", ",".join(self.syscall_names)]
        if self.key:
            out += ["-k", shlex.quote(self.key)]
        return " ".join(out)

    def covers_path(self, path: str | None) -> bool:
        if path is None or self.target is None:
            return False
        if self.kind == "path":
            return path == self.target
        return path == self.target or path.startswith(self.target.rstrip("/") + "/")

    def matches(self, ev: Event, objects: bool = True) -> bool:
        """Does this rule select the event?  objects=False: the kernel already matched
        the rule's object (whatever name reached it); only the operation, permission
        class, syscalls and comparison fields are tested here."""
        if ev.op not in self.ops:
            return False
        if self.syscalls and ev.syscall is not None and ev.syscall not in self.syscalls:
            return False
        for is_object, test in self._tests:
            if (objects or not is_object) and not test(self, ev):
                return False
        conds = self._conds
        if conds and not all(row.holds(ev, c.op, c.value) for row, c in conds):
            return False
        return not self.compares or all(c.holds(ev) for c in self.compares if c.in_consumer)

    def matches_object(self, ev: Event) -> bool:
        """Do the event's names (or inode) match this rule's object?"""
        return all(test(self, ev) for is_object, test in self._tests if is_object)


@dataclass(frozen=True)
class Command:
    """One parsed line: action is add, delete, list, delete-all or control (an
    auditctl setting such as -b or -e, kept with a note of what it means here)."""
    action: str
    rule: Rule | None = None
    source: str | None = None
    line: int | None = None
    note: str | None = None


class RuleTable(dict[int, Rule]):
    """id -> Rule, with an index by identity kept in step with every change, so that
    finding a rule is one lookup.  Several ids with one identity can only come from
    writing the dict directly; the index then names the first, as a scan would."""

    def __init__(self, rules: Mapping[int, Rule] | Iterable[tuple[int, Rule]] = ()) -> None:
        super().__init__()
        self._ids: dict[tuple, int] = {}
        self.version = 0                # changes with every change (for RuleIndex)
        self.update(rules)

    def find(self, identity: tuple) -> int | None:
        return self._ids.get(identity)

    def _unindex(self, rid: int, rule: Rule) -> None:
        ident = rule.identity()
        if self._ids.get(ident) != rid:
            return
        del self._ids[ident]
        for other, r in self.items():   # only with duplicates written directly
            if r.identity() == ident:
                self._ids[ident] = other
                break

    def __setitem__(self, rid: int, rule: Rule) -> None:
        old = self.get(rid)
        self.version += 1
        super().__setitem__(rid, rule)
        if old is not None:
            self._unindex(rid, old)
        ident = rule.identity()
        self._ids.setdefault(ident, rid)

    def __delitem__(self, rid: int) -> None:
        rule = self[rid]
        self.version += 1
        super().__delitem__(rid)
        self._unindex(rid, rule)

    def pop(self, rid: int, *default: Any) -> Any:
        if rid not in self:
            return super().pop(rid, *default)
        rule = self[rid]
        del self[rid]
        return rule

    def popitem(self) -> tuple[int, Rule]:
        rid, rule = super().popitem()
        self.version += 1
        self._unindex(rid, rule)
        return rid, rule

    def setdefault(self, rid: int, rule: Rule) -> Rule:
        if rid not in self:
            self[rid] = rule
        return self[rid]

    def clear(self) -> None:
        super().clear()
        self.version += 1
        self._ids.clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        for rid, rule in dict(*args, **kwargs).items():
            self[rid] = rule

    def __ior__(self, other: Any) -> RuleTable:  # type: ignore[override,misc]
        self.update(other)
        return self

    def copy(self) -> RuleTable:
        new = RuleTable()
        dict.update(new, self)
        new.version = self.version
        new._ids = dict(self._ids)
        return new


UNDER_CACHE_SIZE = 4096        # directories remembered by the rule index


def _subtree_key(path: str) -> str:
    return path.rstrip("/") or "/"


class RuleIndex:
    """The rules by the object they name, so that finding the rules an event may
    concern costs the same for 10 rules as for 10,000: path= rules by their path,
    dir= rules by their directory (an event's path is looked up with each of its
    ancestors), inode rules by inode number; rules naming no object are always
    candidates.  Candidates are only that: Rule.matches decides."""

    def __init__(self, rules: Mapping[int, Rule]) -> None:
        self.exact: dict[str, list[tuple[int, Rule]]] = {}
        self.subtree: dict[str, list[tuple[int, Rule]]] = {}
        self.inode: dict[int, list[tuple[int, Rule]]] = {}
        self.rest: list[tuple[int, Rule]] = []
        self._under_cache: dict[str, tuple[tuple[int, Rule], ...]] = {}
        for rid, rule in rules.items():
            if rule.kind == "path" and rule.target is not None:
                self.exact.setdefault(rule.target, []).append((rid, rule))
            elif rule.kind == "dir" and rule.target is not None:
                self.subtree.setdefault(_subtree_key(rule.target), []).append((rid, rule))
            elif rule.kind == "inode" and rule.inode is not None:
                self.inode.setdefault(rule.inode, []).append((rid, rule))
            else:
                self.rest.append((rid, rule))

    def _under(self, directory: str) -> tuple[tuple[int, Rule], ...]:
        """The dir= rules whose subtree holds the entries of ``directory`` (its own and
        its ancestors'), remembered per directory: events come in runs per directory."""
        hit = self._under_cache.get(directory)
        if hit is None:
            found: list[tuple[int, Rule]] = []
            q = directory
            while True:
                found += self.subtree.get(q, ())
                if q == "/":
                    break
                cut = q.rfind("/")
                if cut < 0:
                    break
                q = q[:cut] or "/"
            if len(self._under_cache) >= UNDER_CACHE_SIZE:
                self._under_cache.clear()
            hit = self._under_cache[directory] = tuple(found)
        return hit

    def _add_path(self, path: str, found: dict[int, Rule]) -> None:
        hit = self.exact.get(path)
        if hit:
            found.update(hit)
        if not self.subtree:
            return
        q = _subtree_key(path)
        hit = self.subtree.get(q)          # the path is a watched directory itself
        if hit:
            found.update(hit)
        cut = q.rfind("/")
        if q != "/" and cut >= 0:
            found.update(self._under(q[:cut] or "/"))

    def candidates(self, ev: Event) -> list[Rule]:
        """The rules that may select the event, in id order."""
        found: dict[int, Rule] = dict(self.rest) if self.rest else {}
        if ev.path:
            self._add_path(ev.path, found)
        if ev.path2:
            self._add_path(ev.path2, found)
        if self.inode and ev.ino is not None:
            found.update(self.inode.get(ev.ino, ()))
        if len(found) < 2:
            return list(found.values())
        return [found[rid] for rid in sorted(found)]


class RuleSet:
    """The rules in force; ids are stable for a rule's lifetime (the eBPF maps use them).

    ``rules`` is the dict id -> Rule (a RuleTable: assigning a plain dict converts it);
    it keeps an index by identity, so find, add and remove take one lookup each.
    """

    def __init__(self, rules: Mapping[int, Rule] | None = None, next_id: int = 1) -> None:
        self.rules = rules if rules is not None else RuleTable()
        self.next_id = next_id
        self._index: RuleIndex | None = None
        self._indexed: tuple[RuleTable | None, int] = (None, -1)

    def index(self) -> RuleIndex:
        """The index of the rules in force, rebuilt after any change."""
        table = self._rules
        if self._index is None or self._indexed[0] is not table \
                or self._indexed[1] != table.version:
            self._index = RuleIndex(table)
            self._indexed = (table, table.version)
        return self._index

    @property
    def rules(self) -> RuleTable:
        return self._rules

    @rules.setter
    def rules(self, rules: Mapping[int, Rule]) -> None:
        self._rules = rules if isinstance(rules, RuleTable) else RuleTable(rules)

    def __repr__(self) -> str:
        return f"RuleSet(rules={dict(self._rules)!r}, next_id={self.next_id!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RuleSet):
            return NotImplemented
        return (dict(self._rules), self.next_id) == (dict(other._rules), other.next_id)

    __hash__ = None  # type: ignore[assignment]

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules.values())

    def __len__(self) -> int:
        return len(self.rules)

    def items(self) -> list[tuple[int, Rule]]:
        return list(self.rules.items())

    def find(self, rule: Rule) -> int | None:
        return self._rules.find(rule.identity())

    def add(self, rule: Rule) -> int:
        if self.find(rule) is not None:
            raise RuleError(f"duplicate rule: {rule.text()}")
        rid = self.next_id
        self.next_id += 1
        self.rules[rid] = rule
        return rid

    def remove(self, rule: Rule) -> int:
        rid = self.find(rule)
        if rid is None:
            raise RuleError(f"no such rule: {rule.text()}")
        del self.rules[rid]
        return rid

    def copy(self) -> RuleSet:
        return RuleSet(self._rules.copy(), self.next_id)

    def apply(self, cmds: Iterable[Command]) -> list[str]:
        """Apply commands to a copy first so that one bad line applies nothing; returns
        the -l listings produced.  Raises RuleError naming the failing rule.
        One command is atomic by itself (add and remove check before they change
        anything), so it needs no copy: applying N commands one at a time is linear."""
        cmds = list(cmds)
        trial = self if len(cmds) == 1 else self.copy()
        listed: list[str] = []
        for cmd in cmds:
            try:
                if cmd.action == "add":
                    trial.add(cmd.rule)  # type: ignore[arg-type]
                elif cmd.action == "delete":
                    trial.remove(cmd.rule)  # type: ignore[arg-type]
            except RuleError as exc:
                raise RuleError(exc.reason, cmd.source, cmd.line) from None
            if cmd.action == "delete-all":
                trial.rules.clear()
            elif cmd.action == "list":
                listed += trial.texts()
        self.rules, self.next_id = trial.rules, trial.next_id
        return listed

    def texts(self) -> list[str]:
        return [r.text() for r in self.rules.values()]

    def match(self, ev: Event) -> list[Rule]:
        """The rules that select the event.  When the backend matched objects in the
        kernel (ev.rule_ids), its verdict on the object decides and the names are only
        for display: only the other parts of those rules are tested here."""
        if ev.rule_ids is not None:
            rules = self.rules
            return [r for rid in ev.rule_ids
                    if (r := rules.get(rid)) is not None and r.matches(ev, objects=False)]
        return [r for r in self.index().candidates(ev) if r.matches(ev)]

    def select(self, ev: Event) -> Event | None:
        """The one place that decides whether an event is reported and with which keys:
        the keys of every rule that selects it, plus those of the per-process audit it
        came from.  None: no rule selects it and it is not from an audited process.
        With no rule at all (an audit of processes only), the backend's scope decides."""
        matched = self.match(ev)
        if not matched and ev.scope_keys is None and self.rules:
            return None
        if len(matched) == 1 and not ev.scope_keys:        # the common case, quickly
            key = matched[0].key
            ev.keys = [key] if key else []
            return ev
        keys = {r.key for r in matched if r.key}
        keys.update(ev.scope_keys or ())
        ev.keys = sorted(keys)
        return ev

    def digest(self) -> str:
        text = "\n".join(sorted(self.texts()))
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]
