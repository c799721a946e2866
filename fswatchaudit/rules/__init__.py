"""The rule language (see ruleset.py); this package re-exports its public API."""
from .ruleset import (
    Command,
    Rule,
    RuleError,
    RuleSet,
    load,
    parse_line,
    parse_lines,
    read_files,
    rules_files,
    watch_rule,
)

__all__ = ["Command", "Rule", "RuleError", "RuleSet", "load", "parse_line", "parse_lines",
           "read_files", "rules_files", "watch_rule"]
