"""search, report and run --summary on real logs made by real traces (the eBPF backend,
as root), plus the time forms, file skipping, --follow across a real rotation, the
human/CSV forms and the HTML page in a real headless browser."""
import contextlib
import csv
import datetime as dt
import io
import json
import os
import pwd
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import pytest
from tracehelp import REPO, Trace

from fswatchaudit.backends import probe
from fswatchaudit.cli import main
from fswatchaudit.events import Event
from fswatchaudit.names import UNSET_ID
from fswatchaudit.search.timeparse import parse_when
from fswatchaudit.sinks import RotatingFileSink
from fswatchaudit.sinks.encode import escape

EBPF = probe("ebpf")
needs_ebpf = pytest.mark.skipif(not EBPF.usable, reason=f"needs eBPF: {EBPF.reason}")
NOBODY = 65534


def fsa(*args, check=True, env=None, timeout=60):
    r = subprocess.run([sys.executable, "-m", "fswatchaudit", *args], cwd=REPO,
                       capture_output=True, timeout=timeout, env=env)
    if check:
        assert r.returncode == 0, r.stderr.decode()
    return r


def cli(*args):
    """The command line run in this process (cheaper than a subprocess): (code, stdout
    bytes, stderr text)."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    err = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    out.flush()
    return code, out.buffer.getvalue(), err.getvalue()


def search_json(*args):
    code, out, err = cli("search", "--json", *args)
    assert code == 0, err
    return [json.loads(line) for line in out.decode().splitlines()], err


@pytest.fixture(scope="module")
def real_log():
    """A log written by a real eBPF trace of a small workload: creates, a chmod, a
    rename, removals, opens, and a failed create by another user (EACCES, then touch's
    ENOENT utimensat)."""
    if not EBPF.usable:
        pytest.skip(f"needs eBPF: {EBPF.reason}")
    base = tempfile.mkdtemp(prefix="fswa-search-", dir="/tmp")
    os.chmod(base, 0o755)
    etc, data = os.path.join(base, "etc"), os.path.join(base, "data")
    os.mkdir(etc, 0o755)
    os.mkdir(data, 0o755)
    rules = os.path.join(base, "audit.rules")
    with open(rules, "w") as fh:
        fh.write(f"-w {etc} -p wa -k cfg\n-w {data} -k data\n")
    log = os.path.join(base, "log", "audit.log")
    os.mkdir(os.path.dirname(log), 0o700)
    trace = Trace("--backend", "ebpf", "-r", rules, "-o", log)
    try:
        script = (f"cd {base} && touch etc/a && chmod 600 etc/a && mv etc/a etc/b && "
                  f"rm etc/b && mkdir data/sub && echo hi > data/sub/x && cat data/sub/x "
                  f"> /dev/null && rm data/sub/x")
        subprocess.run(["sh", "-c", script], check=True)
        subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                        "--clear-groups", "--", "sh", "-c", f"touch {etc}/denied"],
                       capture_output=True)
        trace.wait_for(9)
        time.sleep(0.3)
    finally:
        events, err, code = trace.stop()
    assert code == 0, err
    everything = [json.loads(x) for x in
                  fsa("log", "show", "--json", log).stdout.decode().splitlines()]
    yield {"base": base, "etc": etc, "data": data, "log": log,
           "events": [e for e in everything if e["t"] == "ev"]}
    shutil.rmtree(base, ignore_errors=True)


def user_of(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


FILTERS = [
    # (id, search arguments, the events they select; the filter must not be trivial)
    ("key", lambda L: ["-k", "cfg"], lambda e, L: "cfg" in e.get("keys", [])),
    ("keys-either", lambda L: ["-k", "cfg,data"], lambda e, L: bool(e.get("keys"))),
    ("path-exact", lambda L: ["-f", f"{L['etc']}/b"],
     lambda e, L: f"{L['etc']}/b" in (e.get("path"), e.get("path2"))),
    ("path-prefix", lambda L: ["--under", L["data"]],
     lambda e, L: e["path"].startswith(L["data"] + "/") or e["path"] == L["data"]),
    ("path-glob", lambda L: ["--glob", "*/sub/*"],
     lambda e, L: "/sub/" in e["path"] or "/sub/" in e.get("path2", "")),
    ("op", lambda L: ["--op", "rename"], lambda e, L: e["op"] == "rename"),
    ("alias", lambda L: ["-S", "fs-remove"], lambda e, L: "fs-remove" in e["aliases"]),
    ("pid", lambda L: ["-p", str(L["events"][0]["pid"])],
     lambda e, L: e.get("pid") == L["events"][0]["pid"]),
    ("ppid", lambda L: ["--ppid", str(L["events"][0]["ppid"])],
     lambda e, L: e.get("ppid") == L["events"][0]["ppid"]),
    ("uid-number", lambda L: ["-u", str(NOBODY)], lambda e, L: e.get("uid") == NOBODY),
    ("uid-name", lambda L: ["-u", user_of(NOBODY) or str(NOBODY)],
     lambda e, L: e.get("uid") == NOBODY),
    ("euid", lambda L: ["--euid", "root"], lambda e, L: e.get("euid") == 0),
    ("loginuid", lambda L: ["-ul", "unset" if L["events"][0]["loginuid"] == UNSET_ID
                            else str(L["events"][0]["loginuid"])],
     lambda e, L: e.get("loginuid") == L["events"][0]["loginuid"]),
    ("comm", lambda L: ["-c", "mv"], lambda e, L: e.get("comm") == "mv"),
    ("exe", lambda L: ["-x", os.path.realpath(shutil.which("chmod"))],
     lambda e, L: e.get("exe") == os.path.realpath(shutil.which("chmod"))),
    ("result-failure", lambda L: ["-r", "failure"], lambda e, L: e.get("result", 0) < 0),
    ("result-errno", lambda L: ["-r", "EACCES"], lambda e, L: e.get("result") == -13),
    ("result-success", lambda L: ["-r", "success"], lambda e, L: e.get("result", 0) == 0),
    ("since-relative", lambda L: ["--since", "-10m"], lambda e, L: True),
    ("until-relative", lambda L: ["--until", "-10m"], lambda e, L: False),
    ("since-today", lambda L: ["-ts", "today"], lambda e, L: True),
    ("yesterday-only", lambda L: ["-ts", "yesterday", "-te", "today"], lambda e, L: False),
    ("combined", lambda L: ["-k", "cfg", "-S", "fs-create", "-r", "success"],
     lambda e, L: "cfg" in e.get("keys", []) and "fs-create" in e["aliases"]
     and e.get("result", 0) == 0),
]


@needs_ebpf
@pytest.mark.parametrize("args,expect", [f[1:] for f in FILTERS], ids=[f[0] for f in FILTERS])
def test_each_filter_selects_exactly_its_events(real_log, args, expect):
    got, err = search_json(*args(real_log), real_log["log"])
    want = [e for e in real_log["events"] if expect(e, real_log)]
    assert got == want
    assert f"{len(want)} matched;" in err
    assert "records scanned in 1 files (0 skipped" in err or "in 0 files (1 skipped" in err


@needs_ebpf
def test_the_workload_is_in_the_log_and_filters_are_not_trivial(real_log):
    evs = real_log["events"]
    ops = {e["op"] for e in evs}
    assert {"create", "chmod", "rename", "unlink", "mkdir"} <= ops
    assert any(e.get("result") == -13 and e.get("uid") == NOBODY for e in evs)
    for name, _, expect in FILTERS:
        n = sum(1 for e in evs if expect(e, real_log))
        if name in ("until-relative", "yesterday-only"):
            assert n == 0
        else:
            assert n > 0, name
            assert n < len(evs) or name in ("since-relative", "since-today", "keys-either",
                                                "loginuid")


@needs_ebpf
def test_time_range_by_iso_8601(real_log):
    evs = real_log["events"]
    mid = evs[len(evs) // 2]["time"]
    iso = (dt.datetime.fromtimestamp(0).astimezone()
           + dt.timedelta(microseconds=mid // 1000)).isoformat(timespec="microseconds")
    got, _ = search_json("--since", iso, real_log["log"])
    assert got == [e for e in evs if e["time"] >= mid // 1000 * 1000]
    got, _ = search_json("--until", iso, real_log["log"])
    assert got == [e for e in evs if e["time"] <= mid // 1000 * 1000]


@needs_ebpf
def test_human_lines_time_user_errno_and_columns(real_log, monkeypatch):
    line = fsa("search", "-r", "EACCES", real_log["log"]).stdout.decode()
    assert line.count("\n") == 1
    stamp = line.split()[0]
    dt.datetime.fromisoformat(stamp)                    # an ISO 8601 time column
    assert "result=EACCES" in line and "result=-13" not in line
    assert f"uid={NOBODY}" in line and "loginuid=" in line
    assert "\x1b[" not in line                          # not a terminal: no colour
    # columns: the path starts at the same place whatever the alias set
    lines = cli("search", "-k", "cfg", real_log["log"])[1].decode().splitlines()
    starts = {ln.index(real_log["etc"]) for ln in lines}
    assert len(starts) == 1
    assert any("fs-create,fs-remove" in ln for ln in lines)
    assert b"\x1b[" in cli("search", "--color=always", "-k", "cfg", real_log["log"])[1]
    monkeypatch.setenv("NO_COLOR", "1")
    assert b"\x1b[" not in cli("search", "-k", "cfg", real_log["log"])[1]


@needs_ebpf
def test_csv_output(real_log):
    out = cli("search", "--csv", "-k", "cfg", real_log["log"])[1]
    rows = list(csv.DictReader(io.StringIO(out.decode())))
    want = [e for e in real_log["events"] if "cfg" in e.get("keys", [])]
    assert [row["path"] for row in rows] == [e["path"] for e in want]
    failed = [row for row in rows if row["result"] == "EACCES"]
    assert len(failed) == 1 and failed[0]["uid"] == str(NOBODY)


@needs_ebpf
def test_default_selection_is_the_daemons_log_directory(real_log, tmp_path):
    log = real_log["log"]
    conf = tmp_path / "fswatchaudit.conf"
    conf.write_text(f"log_dir = {os.path.dirname(log)}\nlog_file = audit.log\n")
    got, err = search_json("--config", str(conf), "-k", "cfg")
    assert got == [e for e in real_log["events"] if "cfg" in e.get("keys", [])]


@needs_ebpf
def test_report_tables_and_json(real_log):
    r = fsa("report", "--top", "5", real_log["log"])
    out = r.stdout.decode()
    for title in ("Events per alias and operation", "Events per key", "Events per program",
                  "Events per user", "Failed attempts: 2", "Events per container",
                  "Most changed paths", "Events per minute"):
        assert title in out
    assert "EACCES" in out and "cfg" in out and "data" in out
    data = json.loads(cli("report", "--json", real_log["log"])[1])
    evs = real_log["events"]
    assert data["events"] == len(evs)
    assert data["failed"]["count"] == 2 and {t["result"] for t in data["failed"]["top"]} == \
        {"EACCES", "ENOENT"}
    assert {r["key"]: r["count"] for r in data["per_key"]} == {
        "cfg": sum("cfg" in e["keys"] for e in evs), "data": sum("data" in e["keys"] for e in evs)}
    assert sum(b["count"] for b in data["histogram"]["buckets"]) == len(evs)
    assert data["histogram"]["unit"] == "minute"
    tree = data["path_tree"]
    assert tree["count"] == sum(1 + ("path2" in e) for e in evs)
    # the filters apply to reports too
    only = json.loads(cli("report", "--json", "-k", "data", real_log["log"])[1])
    assert only["events"] == sum("data" in e["keys"] for e in evs)


def png_facts(path):
    with open(path, "rb") as fh:
        blob = fh.read()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", blob[16:24])
    pos, idat = 8, b""
    while pos < len(blob):
        n, kind = struct.unpack(">I4s", blob[pos:pos + 8])
        if kind == b"IDAT":
            idat += blob[pos + 8:pos + 8 + n]
        pos += 12 + n
    pixels = zlib.decompress(idat)
    return width, height, len(set(pixels[::7]))


@needs_ebpf
@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (scripts/setup installs it)")
def test_html_report_renders_in_a_real_browser(real_log, tmp_path):
    page = tmp_path / "report.html"
    fsa("report", "--html", str(page), real_log["log"])
    text = page.read_text()
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text and "<script src" not in text
    profile = tempfile.mkdtemp(prefix="fswa-chromium-")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--window-size=1280,1400"]
    try:
        dom = subprocess.run(["chromium", *flags, "--dump-dom", page.as_uri()],
                             capture_output=True, text=True, timeout=90).stdout
        shot = tmp_path / "report.png"
        subprocess.run(["chromium", *flags, f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, timeout=90)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    # the browser laid the chart out: the page's script counted bars with a real size
    bars = dom.count('class="bar" x=')
    assert bars >= 1
    drawn = int(dom.split('data-bars-drawn="')[1].split('"')[0])
    assert drawn == bars
    assert "Most changed paths" in dom and "Failed attempts (2)" in dom
    assert escape(real_log["etc"].rsplit("/", 1)[1]) in dom
    width, height, colours = png_facts(shot)
    assert (width, height) == (1280, 1400)
    assert shot.stat().st_size > 20_000 and colours > 20


@needs_ebpf
def test_run_summary_counts_paths_and_programs(tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    r = fsa("run", "--summary", "--path", str(d), "--", "sh", "-c",
            f"touch {d}/a {d}/b && chmod 600 {d}/a && rm {d}/a {d}/b")
    err = r.stderr.decode()
    # touch: create + utime; chmod; rm: unlink
    assert "summary: 7 events, 2 paths, 3 programs" in err
    lines = err.splitlines()
    row_a = next(ln for ln in lines if ln.endswith(f"  {d}/a"))
    assert row_a.split()[:5] == ["4", "1", "1", "2", "0"]    # total, create, remove, attr
    assert any(ln.endswith(os.path.realpath(shutil.which("chmod"))) for ln in lines)
    assert any(ln.split()[:1] == ["2"] and ln.endswith(os.path.realpath(shutil.which("rm")))
               for ln in lines)


def test_accepted_but_ignored_options_are_errors():
    code, _, err = cli("trace", "-k", "KEY", "--duration", "0.1")
    assert code == 2 and "-k applies to PATH watches" in err
    code, _, err = cli("run", "-k", "KEY", "--", "true")
    assert code == 2 and "--path" in err
    code, _, err = cli("trace", "--no-children", "/tmp", "--duration", "0.1")
    assert code == 2 and "--no-children applies to --pid" in err
    code, _, err = cli("trace", "--all-namespaces", "/tmp")
    assert code == 2 and "--all-namespaces applies to --container" in err
    assert fsa("--version").stdout.decode().startswith("fswatchaudit ")


# -- synthetic logs written by the real log writer ------------------------------------
HEADER = {"host": "h", "boot_id": "b", "start": 1, "backend": "test", "rules_digest": "d",
          "rules": []}


def ev(n, t, path=None):
    return Event(op="create", path=path or f"/srv/f{n}", backend="test", time=t, seq=n,
                 aliases=["fs-create"], pid=100, uid=0, keys=["k"])


def test_time_range_skips_whole_files(tmp_path):
    log = str(tmp_path / "audit.log")
    w = RotatingFileSink(log, HEADER, rotate_count=10)
    hour = 3600 * 10**9
    now = time.time_ns()
    n = 0
    for f in range(6):              # six files, one hour each, the newest ending now
        for i in range(200):
            t = now - (6 - f) * hour + i * (hour // 200)
            w.write(ev(n, t))
            n += 1
        w.rotate()
    w.close()
    files = [x for x in os.listdir(tmp_path)]
    assert len(files) == 7
    def iso(ns):
        return dt.datetime.fromtimestamp(ns // 10**9).astimezone().isoformat()
    got, err = search_json("--all", "--since", iso(now - 91 * 60 * 10**9), log)
    assert len(got) == 303 and all(e["time"] >= now - 91 * 60 * 10**9 for e in got)
    assert "(4 skipped by time range)" in err
    got, err = search_json("--all", "-te", iso(now - 5 * hour + 10**9), log)
    # the first two files (the second starts right at the bound), and the empty
    # current one: its span is unknown
    assert len(got) == 201 and "in 3 files (4 skipped by time range)" in err
    got, err = search_json("--all", log)
    assert len(got) == 1200 and "(0 skipped" in err


def test_time_forms():
    now = int(dt.datetime(2026, 3, 10, 15, 30).astimezone().timestamp()) * 10**9
    midnight = int(dt.datetime(2026, 3, 10).astimezone().timestamp()) * 10**9
    assert parse_when("today", now) == midnight
    assert parse_when("yesterday", now) == int(
        dt.datetime(2026, 3, 9).astimezone().timestamp()) * 10**9
    assert parse_when("-10m", now) == now - 600 * 10**9
    assert parse_when("-2h", now) == now - 7200 * 10**9
    assert parse_when("-3d", now) == now - 3 * 86400 * 10**9
    assert parse_when("now", now) == now
    assert parse_when("2026-03-10T14:00:00Z", now) == int(
        dt.datetime(2026, 3, 10, 14, tzinfo=dt.UTC).timestamp()) * 10**9
    assert parse_when("2026-03-10", now) == midnight
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_when("last tuesday", now)
    code, _, err = cli("search", "--since", "soon", "/dev/null")
    assert code == 2 and "not a time" in err


def test_follow_reads_across_a_rotation(tmp_path):
    log = str(tmp_path / "audit.log")
    w = RotatingFileSink(log, HEADER, rotate_count=3, flush_interval=0.05)
    now = time.time_ns()
    w.write(ev(0, now, "/srv/before"))
    w.sync()
    out = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "fswatchaudit", "search", "--json",
                             "--follow", "-k", "k", log], cwd=REPO, stdout=out,
                            stderr=subprocess.PIPE)

    def paths():
        out.seek(0)
        return [json.loads(x)["path"] for x in out.read().decode().splitlines()]

    def wait(n):
        deadline = time.monotonic() + 20
        while len(paths()) < n:
            assert time.monotonic() < deadline and proc.poll() is None, paths()
            time.sleep(0.05)
    try:
        wait(1)
        w.write(ev(1, now + 1, "/srv/appended"))
        w.sync()
        wait(2)
        w.write(ev(2, now + 2, "/srv/last-before-rotation"))
        w.rotate()                          # written, then renamed away at once
        w.write(ev(3, now + 3, "/srv/after-rotation"))
        w.sync()
        wait(4)
        w.rotate()
        w.write(ev(4, now + 4, "/srv/second-rotation"))
        w.sync()
        wait(5)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        w.close()
    assert proc.returncode == 0, err
    assert paths() == ["/srv/before", "/srv/appended", "/srv/last-before-rotation",
                       "/srv/after-rotation", "/srv/second-rotation"]


def test_damaged_and_hostile_logs(tmp_path):
    log = str(tmp_path / "audit.log")
    w = RotatingFileSink(log, HEADER)
    hostile = "/srv/x\n\x1b[2Jforged\udcff"
    w.write(ev(0, time.time_ns(), hostile))
    w.close()
    _, out, _ = cli("search", "--color=always", log)
    assert b"\x1b[2J" not in out and out.count(b"\n") == 1
    assert b"/srv/x\\n\\x1b[2Jforged\\xff" in out
    got, _ = search_json(log)
    assert got[0]["path"] == hostile
    assert b"forged\xff" in cli("search", "--csv", log)[1]
    with open(log, "ab") as fh:
        fh.write(b"\x85\xa1t")               # a torn last record
    code, out, err = cli("search", log)
    assert code == 1 and "torn" in err and out.count(b"\n") == 1
    with open(log, "r+b") as fh:
        fh.write(b"\xc1")                    # damage at byte 0
    r = fsa("search", log, check=False)
    assert r.returncode == 1 and b"damaged" in r.stderr and b"Traceback" not in r.stderr


def test_byte_pre_check_agrees_with_the_predicate(tmp_path):
    """Chunks stepped over by the byte pre-check hold no match: the same answers as
    decoding every record, across chunk boundaries and for names stored as bytes."""
    log = str(tmp_path / "audit.log")
    w = RotatingFileSink(log, HEADER)
    now = time.time_ns()
    odd = "/srv/odd\udcfe"
    for i in range(6000):
        path = odd if i in (1234, 5999) else f"/srv/d{i % 13}/f{i}"
        e = ev(i, now + i, path)
        e.exe = "/usr/bin/vim" if i % 2500 == 3 else "/bin/sh"
        e.keys = ["rare"] if i % 1999 == 5 else ["k"]
        w.write(e)
    w.close()
    from fswatchaudit.sinks import LogReader
    evs = [r for r in LogReader(log) if r["t"] == "ev"]
    cases = [(["-f", odd], lambda e: e["path"] == odd),
             (["-x", "/usr/bin/vim"], lambda e: e.get("exe") == "/usr/bin/vim"),
             (["-k", "rare"], lambda e: "rare" in e["keys"]),
             (["--under", "/srv/d7"], lambda e: e["path"].startswith("/srv/d7/")),
             (["-f", "/srv/d3/f3", "--under", "/srv/d5"],
              lambda e: e["path"] == "/srv/d3/f3" or e["path"].startswith("/srv/d5/"))]
    for args, want in cases:
        got, err = search_json(*args, log)
        assert got == [e for e in evs if want(e)], args
        assert "6001 records scanned" in err
    out = cli("search", "-f", odd, log)[1]
    assert out.count(b"/srv/odd\\xfe") == 2


def test_report_path_tree_rolls_directories_up():
    from fswatchaudit.search import Report
    rep = Report(top=2)
    for p, n in (("/etc/ssh/sshd_config", 5), ("/etc/passwd", 3), ("/srv/a/b/c", 2)):
        for _ in range(n):
            rep.add({"t": "ev", "op": "create", "path": p, "time": 10**18,
                     "aliases": ["fs-create"]})
    tree = rep.data()["path_tree"]
    assert tree["count"] == 10
    etc = tree["children"][0]
    assert (etc["name"], etc["count"]) == ("etc", 8)
    assert [(c["name"], c["count"]) for c in etc["children"]] == [
        ("ssh/sshd_config", 5), ("passwd", 3)]
    assert len(tree["children"]) == 1           # /srv is not among the top 2 paths
