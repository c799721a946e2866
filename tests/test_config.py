"""The daemon's configuration file: defaults, documentation, and a clear error for
every unknown or bad key."""
import os

import pytest

from fswatchaudit.service import config
from fswatchaudit.service.config import Config, ConfigError
from fswatchaudit.units import threshold_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "systemd", "fswatchaudit.conf")


def test_empty_file_is_the_defaults():
    assert config.parse("") == Config()
    assert config.parse("# only a comment\n\n   \n") == Config()


def test_shipped_example_sets_every_key_to_its_default():
    with open(EXAMPLE) as fh:
        text = fh.read()
    keys = [line.split("=")[0].strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert sorted(keys) == sorted(config.KEYS)
    assert config.load(EXAMPLE) == Config()


def test_values_are_converted():
    cfg = config.parse("""
        rules_dir = /srv/rules.d
        log_dir = "/srv/log"          # quoted
        log_file = fs.log
        rotate_size = 512K
        rotate_count = 0
        flush_interval = 0.25
        fsync = never
        ring_buffer_size = 1M
        backend = inotify
        disk_full_action = drop-oldest
        space_left = 5%
        control_socket = /run/x/ctl.sock
        status_interval = 2
    """, "test.conf")
    assert cfg.rotate_size == 512 * 1024
    assert cfg.rotate_count == 0
    assert cfg.flush_interval == 0.25
    assert cfg.log_path == "/srv/log/fs.log"
    assert cfg.ring_buffer_size == 1 << 20
    assert threshold_bytes(cfg.space_left, 1000) == 50
    assert threshold_bytes(config.parse("space_left = 1M").space_left, 10 ** 9) == 1 << 20


@pytest.mark.parametrize("text, line, message", [
    ("log_dri = /x", 1, "unknown key 'log_dri' (did you mean 'log_dir'?)"),
    ("\nfrobnicate = 1", 2, "unknown key 'frobnicate'"),
    ("rotate_size = big", 1, "rotate_size: bad size 'big'"),
    ("rotate_size = 1", 1, "rotate_size: '1' is too small"),
    ("rotate_count = -1", 1, "rotate_count: -1 is out of range"),
    ("rotate_count = many", 1, "rotate_count: bad count 'many'"),
    ("flush_interval = 0", 1, "flush_interval: 0 is out of range"),
    ("fsync = sometimes", 1, "fsync: bad value 'sometimes': choose from flush, rotate, never"),
    ("ring_buffer_size = 3M", 1, "ring_buffer_size: '3M' is not a power of two"),
    ("backend = dtrace", 1, "backend: bad value 'dtrace'"),
    ("disk_full_action = panic", 1, "disk_full_action: bad value 'panic'"),
    ("space_left = 120%", 1, "space_left: 120% is out of range"),
    ("log_dir = var/log", 1, "log_dir: 'var/log' is not an absolute path"),
    ("log_file = a/b", 1, "log_file: 'a/b' must be a plain file name"),
    ("backend", 1, "expected 'key = value'"),
    ("= inotify", 1, "expected 'key = value'"),
    ("backend = inotify\nbackend = auto", 2, "backend given twice (first on line 1)"),
])
def test_errors_name_file_line_and_key(text, line, message):
    with pytest.raises(ConfigError) as info:
        config.parse(text, "x.conf")
    assert str(info.value).startswith(f"x.conf:{line}: ")
    assert message in str(info.value)


def test_load_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read configuration"):
        config.load(str(tmp_path / "missing.conf"))


def test_daemon_refuses_bad_config(tmp_path):
    import subprocess
    import sys
    conf = tmp_path / "bad.conf"
    conf.write_text("log_dir = /tmp\nflush_intervall = 1\n")
    proc = subprocess.run([sys.executable, "-m", "fswatchaudit", "daemon", "--config",
                           str(conf)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert f"{conf}:2: unknown key 'flush_intervall' (did you mean 'flush_interval'?)" \
        in proc.stderr


def test_daemon_check(tmp_path):
    import subprocess
    import sys
    rules_d = tmp_path / "rules.d"
    rules_d.mkdir()
    (rules_d / "10.rules").write_text(f"-w {tmp_path} -p wa -k t\n")
    conf = tmp_path / "ok.conf"
    conf.write_text(f"rules_dir = {rules_d}\nlog_dir = {tmp_path}/log\n")
    cmd = [sys.executable, "-m", "fswatchaudit", "daemon", "--check", "--config", str(conf)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"configuration ok: 1 rules from {rules_d}")
    assert not (tmp_path / "log").exists()
    (rules_d / "20.rules").write_text("-a always,exit -F dir=/x -S mkdri\n")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert f"{rules_d}/20.rules:1: unknown syscall or alias 'mkdri'" in proc.stderr


def test_sink_blocks():
    cfg = config.parse("sink.central.kind = syslog\nsink.central.address = tcp://127.0.0.1:6514\n"
                       "sink.copy.kind = jsonl\nsink.copy.path = /var/log/fswatchaudit/a.jsonl\n")
    assert [(s["name"], s["kind"]) for s in cfg.sinks] == [("central", "syslog"),
                                                          ("copy", "jsonl")]
    assert cfg.sinks[0]["address"] == "tcp://127.0.0.1:6514"
    assert cfg.sinks[0]["facility"] == "authpriv" and cfg.sinks[0]["queue"] == 100_000


@pytest.mark.parametrize("text, message", [
    ("sink.a.address = udp://x:1\n", "sink 'a' has no sink.a.kind"),
    ("sink.a.kind = carrier-pigeon\n", "unknown sink kind 'carrier-pigeon'"),
    ("sink.a.kind = jsonl\n", "a jsonl sink needs path"),
    ("sink.a.kind = syslog\nsink.a.colour = red\n", "a syslog sink has no setting 'colour'"),
    ("sink.a.kind = jsonl\nsink.a.path = x.log\n", "path: 'x.log' is not an absolute path"),
    ("sink.a b.kind = jsonl\n", "bad sink key"),
    ("sink.a.kind = jsonl\nsink.a.kind = jsonl\n", r"given twice \(first on line 1\)"),
])
def test_bad_sink_blocks(text, message):
    with pytest.raises(ConfigError, match=message):
        config.parse(text, "f.conf")
