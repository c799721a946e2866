"""Suite-wide hooks.

In CI as root every test must run: a skip there means a missing package, a kernel
feature the runner should have, or a test that silently checks nothing.  When the
environment has CI=true and the suite runs as uid 0, any skipped test (or collection
skip) makes the run fail, and the summary names each one with its reason.  A test that
truly cannot run on a CI runner is exempted with ``@pytest.mark.may_skip("why")``.
"""
from __future__ import annotations

import os

import pytest

# (node id, reason) of each skip that fails this run
_skips: list[tuple[str, str]] = []


def _ci_as_root() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1") and os.geteuid() == 0


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
    else:
        reason = str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_configure(config: pytest.Config) -> None:
    _skips.clear()


def _record(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return  # an xfail is reported as a skip, but it is an expected failure
    if not _ci_as_root():
        return
    if "may_skip" in getattr(report, "keywords", {}):
        return
    _skips.append((report.nodeid or "<collection>", _skip_reason(report)))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _record(report)


@pytest.hookimpl(tryfirst=True)
def pytest_collectreport(report: pytest.CollectReport) -> None:
    _record(report)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _skips and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    skips = _skips
    if not skips:
        return
    terminalreporter.section("skips are failures in CI (CI=true, run as root)",
                             sep="=", red=True, bold=True)
    for nodeid, reason in skips:
        terminalreporter.line(f"SKIPPED {nodeid}: {reason}", red=True)
    terminalreporter.line(f"{len(skips)} skipped test(s) fail this run; a test that "
                          "cannot run on a CI runner is marked @pytest.mark.may_skip(reason)")
