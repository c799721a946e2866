"""Answers from the logs: `search` (the ausearch of this tool) and `report` (its
aureport).

  query.py      the filters, compiled once into one predicate over raw maps
  timeparse.py  --since/--until forms
  source.py     which files, skipping by time range, the streaming scan, --follow
  output.py     human lines, JSON lines, CSV
  report.py     the summaries as data; render.py: terminal tables and the HTML page
"""
from __future__ import annotations

from .query import Query, check_query, compile_query
from .report import Report
from .source import Follower, Scanner, log_files
from .timeparse import parse_when

__all__ = ["Follower", "Query", "Report", "Scanner", "check_query", "compile_query",
           "log_files", "parse_when"]
