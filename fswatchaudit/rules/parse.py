"""Reading rules: a line is split into options, each option has its handler (the
``OPTIONS`` table, as ``opt_handlers[]`` in audit-userspace's src/auditctl.c) that
fills a ParseState, and ``build`` turns the state into a Command."""
from __future__ import annotations

import glob
import os
import shlex
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .. import syscalls as tables
from .fields import (
    FIELDS,
    OPEN_FLAGS_ARG,
    BadValue,
    Field,
    absolute_path,
    field_names,
    operators_text,
    parse_comparison,
    parse_perms,
    split_field,
    suggest,
)
from .ruleset import Command, Compare, Cond, Rule, RuleError, RuleSet

ARG_FIELDS = {"a1": 1, "a2": 2}


@dataclass
class ParseState:
    """What the options of one line said, before any rule is built."""
    source: str | None
    line: int | None
    root: str
    tokens: list[str]
    action: str | None = None
    watch: str | None = None                  # -w/-W path
    perms: frozenset[str] | None = None       # -p
    key: str | None = None                    # -k
    # -F: name -> [(op, text)]; a comparison may be given more than once
    # (auid>=1000 -F auid!=unset), a rule part only once
    fields: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    syscall_names: list[str] = field(default_factory=list)            # -S, as written
    compares: list[Compare] = field(default_factory=list)             # -C
    note: str | None = None                                           # a control line

    def error(self, message: str) -> RuleError:
        return RuleError(message, self.source, self.line)

    def value(self, row: Field, text: str) -> object:
        """The field's value parsed, with file and line on error."""
        try:
            return row.parse(text)
        except BadValue as exc:
            raise self.error(str(exc)) from None


# -- option handlers ---------------------------------------------------------------

def _watch(st: ParseState, opt: str, value: str) -> None:
    try:
        st.watch = absolute_path(value, "watch path")
    except BadValue as exc:
        raise st.error(str(exc)) from None


def _list_action(st: ParseState, opt: str, value: str) -> None:
    if set(value.split(",")) != {"always", "exit"}:
        raise st.error(f"unsupported list/action {value!r}: only 'always,exit'")


def _no_value(st: ParseState, opt: str, value: str) -> None:
    pass


def _perm(st: ParseState, opt: str, value: str) -> None:
    try:
        st.perms = parse_perms(value)
    except BadValue as exc:
        raise st.error(str(exc)) from None


def _key(st: ParseState, opt: str, value: str) -> None:
    if not value or len(value) > 256:
        raise st.error("key must be 1 to 256 characters")
    st.key = value


def _field(st: ParseState, opt: str, value: str) -> None:
    parts = split_field(value)
    if parts is None:
        raise st.error(f"bad field {value!r}: expected NAME=VALUE")
    name, op, text = parts
    row = FIELDS.get(name)
    if row is None:
        raise st.error(f"unsupported field {name!r}{suggest(name, FIELDS)} "
                       f"(supported: {field_names()})")
    if op not in row.operators:
        raise st.error(f"field {name} does not take the operator {op!r} "
                       f"(it takes: {operators_text(row.operators)})")
    if name in st.fields and row.attr is None:
        raise st.error(f"field {name} given twice")
    st.fields.setdefault(name, []).append((op, text))


def _compare(st: ParseState, opt: str, value: str) -> None:
    try:
        left, op, right = parse_comparison(value)
    except BadValue as exc:
        raise st.error(str(exc)) from None
    st.compares.append(Compare(left, op, right))


def _syscall(st: ParseState, opt: str, value: str) -> None:
    for name in value.split(","):
        if not name:
            continue
        try:
            tables.expand_syscall(name)
        except KeyError:
            raise st.error(tables.unaudited_syscall_message(name)) from None
        st.syscall_names.append(name)


# auditctl's settings of the kernel's audit system, and what each means here.
CONTROL_NOTES = {
    "-b": "the kernel audit backlog; here the eBPF ring buffer is ring_buffer_size in the "
          "configuration",
    "--backlog_wait_time": "how long the kernel waits for the audit backlog; the eBPF "
                           "ring never makes a process wait (loss is counted instead)",
    "-f": "the kernel's action on audit failure (silent, printk, panic); here a loss is "
          "counted and reported, never a panic",
    "-e": "enabling or locking kernel auditing (-e 2: immutable); this product's rules "
          "change only through its own daemon and files",
    "-r": "a kernel message rate limit; this product writes every record or counts it",
    "--loginuid-immutable": "a kernel setting for login uids; not this product's",
    "-i": "ignore errors of later lines; `rules check --keep-going` reports them all",
    "-c": "continue past errors; `rules check --keep-going` reports them all",
    "--reset-lost": "reset the kernel's lost counter; ours count from the start",
}


def _control(st: ParseState, opt: str, value: str) -> None:
    words = f"{opt} {value}".strip()
    st.note = f"{words}: no effect here: {CONTROL_NOTES[opt]}"


@dataclass(frozen=True)
class Option:
    handler: Callable[[ParseState, str, str], None]
    takes_value: bool = False
    action: str | None = None      # the action the option is (one per line)
    once: str | None = None        # the ParseState attribute it may set only once


OPTIONS: dict[str, Option] = {
    "-w": Option(_watch, True, action="add"),
    "-W": Option(_watch, True, action="delete"),
    "-a": Option(_list_action, True, action="add"),
    "-A": Option(_list_action, True, action="add"),
    "-d": Option(_list_action, True, action="delete"),
    "-l": Option(_no_value, action="list"),
    "-D": Option(_no_value, action="delete-all"),
    "-p": Option(_perm, True, once="perms"),
    "-k": Option(_key, True, once="key"),
    "-F": Option(_field, True),
    "-C": Option(_compare, True),
    "-S": Option(_syscall, True),
    **{opt: Option(_control, opt in ("-b", "--backlog_wait_time", "-f", "-e", "-r"),
                   action="control") for opt in CONTROL_NOTES},
}


def tokenize(text: str, source: str | None = None, line: int | None = None) -> list[str]:
    """The words of a rule line ([] for blank lines and comments)."""
    stripped = text.strip()
    if not stripped or stripped.startswith("#"):
        return []
    try:
        return shlex.split(stripped, comments=True)
    except ValueError as exc:
        raise RuleError(f"cannot split rule: {exc}", source, line) from None


def read_options(tokens: list[str], source: str | None = None, line: int | None = None,
                 root: str = "/") -> ParseState:
    """Run each option's handler over the tokens."""
    st = ParseState(source, line, root, tokens)
    it = iter(tokens)
    for tok in it:
        opt = OPTIONS.get(tok)
        if opt is None:
            raise st.error(f"unknown option {tok!r}")
        if opt.action is not None:
            if st.action is not None:
                raise st.error(f"{tok} cannot be combined with an earlier {st.action} option")
            st.action = opt.action
        if opt.once is not None and getattr(st, opt.once) is not None:
            raise st.error(f"{tok} given twice")
        value = ""
        if opt.takes_value:
            try:
                value = next(it)
            except StopIteration:
                raise st.error(f"option {tok} needs a value") from None
        opt.handler(st, tok, value)
    return st


# -- building the rule -------------------------------------------------------------

def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def _watch_rule(st: ParseState, watch: str) -> Rule:
    if st.fields or st.syscall_names or st.compares:
        raise st.error("-w/-W cannot be combined with -F, -C or -S")
    host = os.path.join(st.root, watch.lstrip("/"))
    return Rule(kind="dir" if _is_dir(host) else "path", target=watch,
                perms=st.perms or FIELDS["perm"].default, key=st.key, from_watch=True)


def _check_form(st: ParseState) -> None:
    """What fields can go together (before any value is read)."""
    given = st.fields
    if st.perms is not None:
        raise st.error("-p goes with -w; with -a use -F perm=")
    if "key" in given and st.key is not None:
        raise st.error("key given twice (-k and -F key=)")
    targets = [row.name for row in FIELDS.values() if row.kind and row.name in given]
    if "inode" in targets and len(targets) > 1:
        raise st.error("inode= cannot be combined with path= or dir= "
                       "(the inode would be ignored)")
    if len(targets) > 1:
        raise st.error("give only one of path= and dir=")
    if not targets and not st.syscall_names:
        raise st.error("a rule needs -F path=, -F dir=, -F inode= or, for every object, "
                       "-S with the syscalls to audit")
    if "dev" in given and "inode" not in given:
        raise st.error("dev= goes with inode=")


def _syscall_rule(st: ParseState) -> Rule:
    _check_form(st)
    parts: dict[str, object] = {"key": st.key}
    conds: list[Cond] = []
    kind = ""
    for row in FIELDS.values():
        for op, text in st.fields.get(row.name, ()):
            value = st.value(row, text)
            if row.kind is not None:
                kind = row.kind
            if row.part is not None:
                parts[row.part] = value
            elif row.attr is not None:
                conds.append(Cond(row.name, op, value))
    for cond in conds:
        if cond.name in ARG_FIELDS and not any(
                OPEN_FLAGS_ARG.get(name) == ARG_FIELDS[cond.name] for name in st.syscall_names):
            raise st.error(f"field {cond.name} is understood only as the open flags: a1 "
                           "of -S open, a2 of -S openat or open_by_handle_at")
    if not kind:
        kind = "syscall"            # no object named: the syscalls on every object
    if "arch" not in st.fields:
        conds.insert(0, Cond("arch", "=", "b64"))      # the machine's own table
    if kind == "inode" and "dev" not in st.fields:
        parts["dev"] = os.stat(st.root).st_dev
    names = st.syscall_names
    calls: frozenset[str] = frozenset()
    ops = tables.ALL_OPS
    if names and "all" not in names:
        call_set: set[str] = set()
        op_set: set[str] = set()
        for n in names:
            c, o = tables.expand_syscall(n)
            call_set |= c
            op_set |= o
        calls, ops = frozenset(call_set), frozenset(op_set)
    return Rule(kind=kind, syscalls=calls, ops=ops, syscall_names=tuple(dict.fromkeys(names)),
                conds=tuple(conds), compares=tuple(dict.fromkeys(st.compares)),
                **parts)  # type: ignore[arg-type]


def build(st: ParseState) -> Command:
    """The Command the options of one line make."""
    if st.action is None:
        raise st.error("no action: use -w, -W, -a, -d, -l or -D")
    if st.action in ("list", "delete-all"):
        if len(st.tokens) != 1:
            raise st.error(f"{st.tokens[0]} takes no other options")
        return Command(st.action, None, st.source, st.line)
    if st.action == "control":
        return Command("control", None, st.source, st.line, note=st.note)
    if st.watch is not None:
        rule = _watch_rule(st, st.watch)
    else:
        rule = _syscall_rule(st)
    return Command(st.action, rule, st.source, st.line)


def parse_line(text: str, source: str | None = None, line: int | None = None,
               root: str = "/") -> Command | None:
    """Parse one rule line; None for blank lines and comments.

    ``root`` is where paths are looked up to tell a directory watch from a file watch
    (a container's /proc/PID/root when auditing from the outside).
    """
    tokens = tokenize(text, source, line)
    if not tokens:
        return None
    return build(read_options(tokens, source, line, root))


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


def read_text(path: str) -> str:
    """A rules file's text; names are bytes, so a path that is not UTF-8 is kept as
    it is written."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            return fh.read()
    except OSError as exc:
        raise RuleError(f"cannot read rules file: {exc.strerror}", path) from None


def read_files(paths: Iterable[str], root: str = "/",
               problems: list[RuleError] | None = None) -> list[Command]:
    """Parse rules files (or rules.d directories) completely before anything is applied.
    With ``problems``, every bad line is collected there and the others are returned
    (`rules check --keep-going`); without, the first one is raised."""
    cmds: list[Command] = []
    for path in rules_files(paths):
        try:
            lines = read_text(path).splitlines()
        except RuleError as exc:
            if problems is None:
                raise
            problems.append(exc)
            continue
        for number, text in enumerate(lines, 1):
            try:
                cmd = parse_line(text, path, number, root)
            except RuleError as exc:
                if problems is None:
                    raise
                problems.append(exc)
                continue
            if cmd is not None:
                cmds.append(cmd)
    return cmds


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
