"""The rule language: an auditctl-compatible subset for filesystem watches.

    -w PATH [-p PERMS] [-k KEY]          watch (a directory: its whole subtree)
    -W PATH [-p PERMS] [-k KEY]          remove that watch
    -a always,exit -F path=P|dir=D|inode=N [-F dev=MAJ:MIN] [-F perm=PERMS]
                   [-F arch=b64] [-S NAME[,NAME]]... [-k KEY]
    -d ...same fields...                 delete that rule
    -l                                   list
    -D                                   delete all

Paths are strings only here; the backends resolve them to (device, inode) pairs.

    fields.py    the -F fields as a table (value parser, operators, where evaluated)
    parse.py     options and their handlers, building a rule, reading rules files
    ruleset.py   Rule, Command and RuleSet (with RuleSet.select, the one match)
"""
from .fields import FIELDS, Field, Where
from .parse import (
    load,
    parse_line,
    parse_lines,
    read_files,
    rules_files,
    watch_rule,
)
from .ruleset import Command, Cond, Rule, RuleError, RuleSet

__all__ = ["FIELDS", "Command", "Cond", "Field", "Rule", "RuleError", "RuleSet", "Where",
           "load", "parse_line", "parse_lines", "read_files", "rules_files", "watch_rule"]
