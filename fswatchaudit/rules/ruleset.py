"""The rule language: an auditctl-compatible subset for filesystem watches.

    -w PATH [-p PERMS] [-k KEY]          watch (a directory: its whole subtree)
    -W PATH [-p PERMS] [-k KEY]          remove that watch
    -a always,exit -F path=P|dir=D|inode=N [-F dev=MAJ:MIN] [-F perm=PERMS]
                   [-F arch=b64] [-S NAME[,NAME]]... [-k KEY]
    -d ...same fields...                 delete that rule
    -l                                   list
    -D                                   delete all

Paths are strings only here; the backends resolve them to (device, inode) pairs.
"""
from __future__ import annotations

import difflib
import glob
import hashlib
import os
import shlex
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .. import syscalls as tables
from ..errors import LocatedError
from ..events import Event


class RuleError(LocatedError):
    """A rule that cannot be applied; the message names the problem and where it is."""


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

    def identity(self) -> tuple:
        """What makes two rules the same rule (for duplicates and -d)."""
        return (self.kind, self.target, self.inode, self.dev, self.perms, self.ops,
                self.syscalls, self.key)

    def text(self) -> str:
        """The normalised rule, in the form `rules check` prints and -l lists."""
        perms = "".join(p for p in tables.PERM_LETTERS if p in self.perms)
        if self.from_watch:
            out = ["-w", shlex.quote(self.target or "")]
            if perms != tables.PERM_LETTERS:
                out += ["-p", perms]
        else:
            out = ["-a", "always,exit", "-F", "arch=b64"]
            if self.kind == "inode":
                out += ["-F", f"inode={self.inode}", "-F",
                        f"dev={os.major(self.dev or 0)}:{os.minor(self.dev or 0)}"]
            else:
                out += ["-F", f"{self.kind}={shlex.quote(self.target or '')}"]
            if perms != tables.PERM_LETTERS:
                out += ["-F", f"perm={perms}"]
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

    def matches(self, ev: Event) -> bool:
        """Does this rule select the event?  Used by backends that cannot filter exactly
        in the kernel, and to attach keys."""
        if ev.op not in self.ops:
            return False
        if not (tables.perms_for(ev.op, ev.access) & self.perms):
            return False
        if self.syscalls and ev.syscall is not None and ev.syscall not in self.syscalls:
            return False
        if self.kind == "inode":
            return ev.ino == self.inode and (self.dev is None or ev.dev == self.dev)
        return self.covers_path(ev.path) or self.covers_path(ev.path2)


@dataclass(frozen=True)
class Command:
    """One parsed line: action is add, delete, list or delete-all."""
    action: str
    rule: Rule | None = None
    source: str | None = None
    line: int | None = None


def _perms(value: str, source: str | None, line: int | None) -> frozenset[str]:
    bad = sorted(set(value) - set(tables.PERM_LETTERS))
    if not value or bad:
        raise RuleError(f"bad permission letters {value!r}: use letters from "
                        f"'{tables.PERM_LETTERS}' (read, write, execute, attribute)",
                        source, line)
    return frozenset(value)


def _absolute(value: str, what: str, source: str | None, line: int | None) -> str:
    if not value:
        raise RuleError(f"empty {what}", source, line)
    if not os.path.isabs(value):
        raise RuleError(f"{what} {value!r} is relative: rules need absolute paths",
                        source, line)
    norm = os.path.normpath(value)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    return norm


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, tables.known_syscall_names(), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _dev(value: str, source: str | None, line: int | None) -> int:
    try:
        major, minor = value.split(":")
        return os.makedev(int(major), int(minor))
    except ValueError:
        raise RuleError(f"bad dev {value!r}: expected MAJOR:MINOR", source, line) from None


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def parse_line(text: str, source: str | None = None, line: int | None = None,
               root: str = "/") -> Command | None:
    """Parse one rule line; None for blank lines and comments.

    ``root`` is where paths are looked up to tell a directory watch from a file watch
    (a container's /proc/PID/root when auditing from the outside).
    """
    stripped = text.strip()
    if not stripped or stripped.startswith("#"):
        return None
    try:
        tokens = shlex.split(stripped, comments=True)
    except ValueError as exc:
        raise RuleError(f"cannot split rule: {exc}", source, line) from None
    if not tokens:
        return None

    action: str | None = None
    watch: str | None = None
    perms: frozenset[str] | None = None
    key: str | None = None
    fields: dict[str, str] = {}
    names: list[str] = []

    def set_action(new: str) -> None:
        nonlocal action
        if action is not None:
            raise RuleError(f"{tok} cannot be combined with an earlier {action} option",
                            source, line)
        action = new

    it = iter(tokens)
    for tok in it:
        def value(opt: str = tok) -> str:
            try:
                return next(it)
            except StopIteration:
                raise RuleError(f"option {opt} needs a value", source, line) from None
        if tok in ("-w", "-W"):
            set_action("add" if tok == "-w" else "delete")
            watch = _absolute(value(), "watch path", source, line)
        elif tok in ("-a", "-A", "-d"):
            set_action("delete" if tok == "-d" else "add")
            lst = value()
            parts = set(lst.split(","))
            if parts != {"always", "exit"}:
                raise RuleError(f"unsupported list/action {lst!r}: only 'always,exit'",
                                source, line)
        elif tok == "-l":
            set_action("list")
        elif tok == "-D":
            set_action("delete-all")
        elif tok == "-p":
            if perms is not None:
                raise RuleError("-p given twice", source, line)
            perms = _perms(value(), source, line)
        elif tok == "-k":
            if key is not None:
                raise RuleError("-k given twice", source, line)
            key = value()
            if not key or len(key) > 256:
                raise RuleError("key must be 1 to 256 characters", source, line)
        elif tok == "-F":
            f = value()
            name, sep, val = f.partition("=")
            if not sep:
                raise RuleError(f"bad field {f!r}: expected NAME=VALUE", source, line)
            if name not in ("path", "dir", "inode", "dev", "perm", "arch", "key"):
                raise RuleError(f"unsupported field {name!r} (supported: path, dir, inode, "
                                "dev, perm, arch, key)", source, line)
            if name in fields:
                raise RuleError(f"field {name} given twice", source, line)
            fields[name] = val
        elif tok == "-S":
            for n in value().split(","):
                if not n:
                    continue
                try:
                    tables.expand_syscall(n)
                except KeyError:
                    raise RuleError(f"unknown syscall or alias {n!r}{_suggest(n)}",
                                    source, line) from None
                names.append(n)
        else:
            raise RuleError(f"unknown option {tok!r}", source, line)

    if action is None:
        raise RuleError("no action: use -w, -W, -a, -d, -l or -D", source, line)
    if action in ("list", "delete-all"):
        if len(tokens) != 1:
            raise RuleError(f"{tokens[0]} takes no other options", source, line)
        return Command(action, None, source, line)

    if watch is not None:
        if fields or names:
            raise RuleError("-w/-W cannot be combined with -F or -S", source, line)
        host = os.path.join(root, watch.lstrip("/"))
        rule = Rule(kind="dir" if _is_dir(host) else "path", target=watch,
                    perms=perms or frozenset(tables.PERM_LETTERS), key=key,
                    from_watch=True)
        return Command(action, rule, source, line)

    if perms is not None:
        raise RuleError("-p goes with -w; with -a use -F perm=", source, line)
    if "key" in fields:
        if key is not None:
            raise RuleError("key given twice (-k and -F key=)", source, line)
        key = fields["key"]
    arch = fields.get("arch", "b64")
    if arch not in ("b64", "b32"):
        raise RuleError(f"bad arch {arch!r}: expected b64 or b32", source, line)
    targets = [n for n in ("path", "dir", "inode") if n in fields]
    if "inode" in fields and len(targets) > 1:
        raise RuleError("inode= cannot be combined with path= or dir= "
                        "(the inode would be ignored)", source, line)
    if len(targets) > 1:
        raise RuleError("give only one of path= and dir=", source, line)
    if not targets:
        raise RuleError("a rule needs -F path=, -F dir= or -F inode=", source, line)
    kind = targets[0]
    target = inode = dev = None
    if kind == "inode":
        try:
            inode = int(fields["inode"], 0)
            if inode <= 0:
                raise ValueError
        except ValueError:
            raise RuleError(f"bad inode {fields['inode']!r}: expected a positive number",
                            source, line) from None
        dev = _dev(fields["dev"], source, line) if "dev" in fields else os.stat(root).st_dev
    else:
        if "dev" in fields:
            raise RuleError("dev= goes with inode=", source, line)
        target = _absolute(fields[kind], f"{kind}=", source, line)

    sc: frozenset[str] = frozenset()
    ops = tables.ALL_OPS
    if names and "all" not in names:
        calls: set[str] = set()
        op_set: set[str] = set()
        for n in names:
            c, o = tables.expand_syscall(n)
            calls |= c
            op_set |= o
        sc, ops = frozenset(calls), frozenset(op_set)
    rule_perms = _perms(fields["perm"], source, line) if "perm" in fields \
        else frozenset(tables.PERM_LETTERS)
    rule = Rule(kind=kind, target=target, inode=inode, dev=dev, perms=rule_perms,
                syscalls=sc, ops=ops, key=key,
                syscall_names=tuple(dict.fromkeys(names)))
    return Command(action, rule, source, line)


def parse_lines(lines: Iterable[str], source: str | None = None,
                root: str = "/") -> list[Command]:
    out = []
    for number, text in enumerate(lines, 1):
        cmd = parse_line(text, source, number, root)
        if cmd is not None:
            out.append(cmd)
    return out


def rules_files(paths: Iterable[str]) -> list[str]:
    """Expand directories (rules.d) to their *.rules files in lexical order."""
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(glob.glob(os.path.join(glob.escape(p), "*.rules")))
        else:
            out.append(p)
    return out


def read_files(paths: Iterable[str], root: str = "/") -> list[Command]:
    """Parse rules files (or rules.d directories) completely before anything is applied."""
    cmds: list[Command] = []
    for path in rules_files(paths):
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise RuleError(f"cannot read rules file: {exc.strerror}", path) from None
        cmds += parse_lines(text.splitlines(), path, root)
    return cmds


@dataclass
class RuleSet:
    """The rules in force; ids are stable for a rule's lifetime (the eBPF maps use them)."""
    rules: dict[int, Rule] = field(default_factory=dict)
    next_id: int = 1

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules.values())

    def __len__(self) -> int:
        return len(self.rules)

    def items(self) -> list[tuple[int, Rule]]:
        return list(self.rules.items())

    def find(self, rule: Rule) -> int | None:
        ident = rule.identity()
        for rid, r in self.rules.items():
            if r.identity() == ident:
                return rid
        return None

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
        return RuleSet(dict(self.rules), self.next_id)

    def apply(self, cmds: Iterable[Command]) -> list[str]:
        """Apply commands to a copy first so that one bad line applies nothing; returns
        the -l listings produced.  Raises RuleError naming the failing rule."""
        trial = self.copy()
        listed: list[str] = []
        for cmd in cmds:
            try:
                if cmd.action == "add":
                    trial.add(cmd.rule)
                elif cmd.action == "delete":
                    trial.remove(cmd.rule)
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
        return [r for r in self.rules.values() if r.matches(ev)]

    def select(self, ev: Event) -> Event | None:
        """The one place that decides whether an event is reported and with which keys:
        the keys of every rule that selects it, plus those of the per-process audit it
        came from.  None: no rule selects it and it is not from an audited process.
        With no rule at all (an audit of processes only), the backend's scope decides."""
        matched = self.match(ev)
        if not matched and ev.scope_keys is None and self.rules:
            return None
        keys = {r.key for r in matched if r.key}
        keys.update(ev.scope_keys or ())
        ev.keys = sorted(keys)
        return ev

    def digest(self) -> str:
        return hashlib.sha256("\n".join(sorted(self.texts())).encode()).hexdigest()[:16]


def load(paths: Iterable[str], root: str = "/") -> RuleSet:
    """A fresh RuleSet from rules files; atomic: any error and nothing is returned."""
    rs = RuleSet()
    rs.apply(read_files(paths, root))
    return rs


def watch_rule(path: str, perms: str | None = None, key: str | None = None) -> Rule:
    """The rule `trace PATH -p PERMS -k KEY` means (-w semantics)."""
    line = ["-w", path] + (["-p", perms] if perms else []) + (["-k", key] if key else [])
    cmd = parse_line(shlex.join(line))
    assert cmd is not None and cmd.rule is not None
    return cmd.rule
