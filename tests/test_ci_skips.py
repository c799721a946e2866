"""The CI guard of tests/conftest.py: with CI=true as root a skip fails the run and is
named with its reason; a may_skip test is exempt; without CI=true skips pass."""
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the guard applies to root runs")

SKIPPING = '''
import pytest

def test_runs():
    assert True

def test_skips_in_body():
    pytest.skip("no widget on this host")

@pytest.mark.skipif(True, reason="widget kernel feature missing")
def test_skipped_by_mark():
    pass

@pytest.mark.xfail(reason="known bug", strict=True)
def test_expected_failure():
    assert False
'''

EXEMPT = '''
import pytest

@pytest.mark.may_skip("runners have no widget")
def test_exempt():
    pytest.skip("no widget on this host")

def test_runs():
    assert True
'''


def run_pytest(tmp_path, source: str, ci: str | None) -> subprocess.CompletedProcess:
    """Run a tiny suite with this repository's conftest.py and pytest settings."""
    shutil.copy(os.path.join(HERE, "conftest.py"), tmp_path / "conftest.py")
    shutil.copy(os.path.join(REPO, "pyproject.toml"), tmp_path / "pyproject.toml")
    (tmp_path / "test_tiny.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--strict-markers", "-p", "no:cacheprovider",
         "-o", "testpaths=.", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_skip_fails_the_run_in_ci(tmp_path):
    out = run_pytest(tmp_path, SKIPPING, ci="true")
    assert out.returncode == pytest.ExitCode.TESTS_FAILED, out.stdout + out.stderr
    assert "skips are failures in CI" in out.stdout
    assert "test_tiny.py::test_skips_in_body: no widget on this host" in out.stdout
    assert "test_tiny.py::test_skipped_by_mark: widget kernel feature missing" in out.stdout
    assert "2 skipped test(s) fail this run" in out.stdout
    assert "test_expected_failure" not in out.stdout.split("skips are failures")[1]


def test_skips_pass_outside_ci(tmp_path):
    for ci in (None, "false", ""):
        out = run_pytest(tmp_path, SKIPPING, ci=ci)
        assert out.returncode == pytest.ExitCode.OK, out.stdout + out.stderr
        assert "skips are failures" not in out.stdout
        assert "2 skipped" in out.stdout


def test_may_skip_is_exempt(tmp_path):
    out = run_pytest(tmp_path, EXEMPT, ci="true")
    assert out.returncode == pytest.ExitCode.OK, out.stdout + out.stderr
    assert "skips are failures" not in out.stdout
    assert "1 skipped" in out.stdout


def test_module_skipped_at_collection_fails_in_ci(tmp_path):
    source = 'import pytest\npytest.skip("module needs a widget", allow_module_level=True)\n'
    (tmp_path / "test_other.py").write_text("def test_runs():\n    pass\n")
    out = run_pytest(tmp_path, source, ci="true")
    assert out.returncode == pytest.ExitCode.TESTS_FAILED, out.stdout + out.stderr
    assert "test_tiny.py: module needs a widget" in out.stdout
    assert run_pytest(tmp_path, source, ci=None).returncode == pytest.ExitCode.OK


def test_a_failure_stays_a_failure(tmp_path):
    out = run_pytest(tmp_path, SKIPPING + "\ndef test_fails():\n    assert False\n", ci="true")
    assert out.returncode == pytest.ExitCode.TESTS_FAILED, out.stdout + out.stderr
    assert "test_tiny.py::test_skips_in_body: no widget on this host" in out.stdout
