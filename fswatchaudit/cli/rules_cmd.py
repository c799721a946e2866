"""`rules check` and `rules import`: validate rules files; bring Linux audit rules over."""
from __future__ import annotations

import argparse
import os
import sys

from .. import rules as rules_mod
from ..errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from ..rules import RuleError, RuleSet
from ..rules.importer import import_rules


def _write_lines(lines: list[str]) -> None:
    out = sys.stdout.buffer        # rule lines with raw bytes in names print as written
    for text in lines:
        out.write(text.encode("utf-8", "surrogateescape") + b"\n")
    out.flush()


def cmd_rules_check(args: argparse.Namespace) -> int:
    problems: list[RuleError] | None = [] if args.keep_going else None
    rs = RuleSet()
    try:
        cmds = rules_mod.read_files(args.files, problems=problems)
        for cmd in cmds:
            try:
                rs.apply([cmd])
            except RuleError as exc:
                if problems is None:
                    raise
                problems.append(exc)
    except RuleError as exc:
        print(f"fswatchaudit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for cmd in cmds:
        if cmd.note:
            print(f"fswatchaudit: note: {cmd.source}:{cmd.line}: {cmd.note}", file=sys.stderr)
    if problems:
        for problem in problems:
            print(f"fswatchaudit: {problem}", file=sys.stderr)
        print(f"fswatchaudit: {len(problems)} problem(s)", file=sys.stderr)
        return EXIT_USAGE
    _write_lines(rs.texts())
    return EXIT_OK


def cmd_rules_import(args: argparse.Namespace) -> int:
    try:
        lines = import_rules(args.paths)
    except RuleError as exc:
        print(f"fswatchaudit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    left_out = [line for line in lines if not line.kept]
    for line in lines:
        if line.reason:
            what = "kept, but" if line.kept else "left out"
            print(f"fswatchaudit: {line.source}:{line.number}: {what}: {line.reason}\n"
                  f"    {line.text}", file=sys.stderr)
    by_file: dict[str, list[str]] = {}
    for line in lines:
        if line.rule is not None:
            by_file.setdefault(line.source, []).append(line.rule)
    if args.output_dir:
        try:
            os.makedirs(args.output_dir, exist_ok=True)
            for source, texts in by_file.items():
                target = os.path.join(args.output_dir, os.path.basename(source))
                with open(target, "x", encoding="utf-8", errors="surrogateescape") as fh:
                    fh.write(f"# imported from {source}\n" + "\n".join(texts) + "\n")
        except OSError as exc:
            print(f"fswatchaudit: cannot write {exc.filename}: {exc.strerror}",
                  file=sys.stderr)
            return EXIT_FAILURE
    else:
        out: list[str] = []
        for source, texts in by_file.items():
            out += [f"# imported from {source}", *texts]
        _write_lines(out)
    kept = sum(1 for line in lines if line.kept)
    print(f"fswatchaudit: {kept} rules imported, {len(left_out)} lines left out",
          file=sys.stderr)
    return EXIT_FAILURE if left_out else EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    rules_p = sub.add_parser("rules", help="rule files")
    rules_sub = rules_p.add_subparsers(dest="rules_command", required=True)
    check = rules_sub.add_parser(
        "check", help="validate and print normalised rules",
        description="Validate rules files and print the rules normalised. Exit 0 valid, "
                    "2 not.")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("--keep-going", action="store_true",
                       help="report every problem of every file, not only the first")
    check.set_defaults(func=cmd_rules_check)
    imp = rules_sub.add_parser(
        "import", help="convert Linux audit rules (audit.rules, rules.d)",
        description="Read Linux audit rules (an audit.rules file or a rules.d directory) "
                    "and write the equivalent rules of this product, keeping every "
                    "file-system rule. Each line left out is listed on stderr with the "
                    "reason. Exit 0 when every line was kept, 1 when some were left out, "
                    "2 when a file cannot be read.")
    imp.add_argument("paths", nargs="+", metavar="PATH")
    imp.add_argument("-o", "--output-dir", metavar="DIR",
                     help="write one rules file per file read into DIR (new files only) "
                          "instead of standard output")
    imp.set_defaults(func=cmd_rules_import)
