"""`rules import`: Linux audit rules (audit.rules, rules.d) into this product's rules.

Every file-system rule is kept; what is not is listed with the reason.  A line is
first read as written; where that fails for a reason the import can mend without
changing what the rule selects (syscalls outside the file domain named beside file
ones), the rule is kept with those names left out, and the note says so.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass

from .. import syscalls as tables
from .parse import parse_line, read_text, rules_files, tokenize
from .ruleset import Command, RuleError, RuleSet


@dataclass
class Line:
    """One line of an imported file and what became of it."""
    source: str
    number: int
    text: str                          # as written
    rule: str | None = None            # the rule kept, normalised
    reason: str | None = None          # why it is left out (or what was left out of it)

    @property
    def kept(self) -> bool:
        return self.rule is not None


def _file_syscalls_only(tokens: list[str]) -> tuple[list[str], list[str]]:
    """The tokens with -S names outside the file domain removed, and those names."""
    out: list[str] = []
    dropped: list[str] = []
    it = iter(tokens)
    for tok in it:
        if tok != "-S":
            out.append(tok)
            continue
        value = next(it, "")
        names = [n for n in value.split(",") if n]
        keep = [n for n in names if _known(n)]
        dropped += [n for n in names if not _known(n)]
        if keep:
            out += ["-S", ",".join(keep)]
    return out, dropped


def _known(name: str) -> bool:
    try:
        tables.expand_syscall(name)
        return True
    except KeyError:
        return False


def _reason(text: str, exc: RuleError) -> str:
    """A reason a person would accept, for a line the parser refused."""
    tokens = tokenize(text)
    if len(tokens) > 1 and tokens[0] in ("-a", "-A", "-d"):
        lists = set(tokens[1].split(","))
        if lists & {"never", "exclude", "user", "task", "filesystem", "io_uring"}:
            return (f"the list/action {tokens[1]!r} is not supported: this product only "
                    "reports what always,exit rules select (no exclusions or other lists)")
    return exc.reason


def import_line(source: str, number: int, text: str) -> Line | None:
    """What one line becomes; None for blank lines and comments."""
    try:
        tokens = tokenize(text, source, number)
    except RuleError as exc:
        return Line(source, number, text, reason=exc.reason)
    if not tokens:
        return None
    line = Line(source, number, text.strip())
    try:
        cmd = parse_line(text, source, number)
    except RuleError as exc:
        fixed, dropped = _file_syscalls_only(tokens)
        if dropped and "-S" in fixed:
            try:
                cmd = parse_line(shlex.join(fixed), source, number)
            except RuleError as again:
                line.reason = _reason(text, again)
                return line
            line.reason = (f"kept without {', '.join(dropped)}: not file-system syscalls, "
                           "not audited by this product")
        elif dropped:
            line.reason = (f"not a file-system rule: {', '.join(dropped)} "
                           f"{'is' if len(dropped) == 1 else 'are'} not audited by this "
                           "product")
            return line
        else:
            line.reason = _reason(text, exc)
            return line
    assert cmd is not None
    if cmd.action == "control":
        line.reason = cmd.note
    elif cmd.action == "delete-all":
        line.reason = "-D (delete every rule) is implied: an import starts from no rules"
    elif cmd.action == "list":
        line.reason = "-l (list) does nothing in a rules file"
    elif cmd.action == "delete":
        line.reason = "a delete line (-W, -d) has nothing to delete in an import"
    else:
        assert cmd.rule is not None
        line.rule = cmd.rule.text()
    return line


def import_rules(paths: list[str]) -> list[Line]:
    """Every non-blank line of the files (rules.d directories in lexical order, as
    augenrules reads them).  Rules that repeat an earlier one are left out with the
    place of the first (auditctl refuses them too)."""
    out: list[Line] = []
    seen = RuleSet()
    first: dict[int, Line] = {}
    for path in rules_files(paths):
        for number, text in enumerate(read_text(path).splitlines(), 1):
            line = import_line(path, number, text)
            if line is None:
                continue
            if line.rule is not None:
                cmd = parse_line(line.rule)
                assert cmd is not None and cmd.rule is not None
                rid = seen.find(cmd.rule)
                if rid is not None:
                    earlier = first[rid]
                    line.rule = None
                    line.reason = (f"the same rule as {earlier.source}:{earlier.number}")
                else:
                    first[seen.add(cmd.rule)] = line
            out.append(line)
    return out


def commands(lines: list[Line]) -> list[Command]:
    """The kept rules as commands, to load."""
    out: list[Command] = []
    for line in lines:
        if line.rule is not None:
            cmd = parse_line(line.rule, line.source, line.number)
            assert cmd is not None
            out.append(cmd)
    return out
