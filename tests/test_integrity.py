"""Tamper-evident logs: untouched logs pass `log verify`; every kind of tampering is
caught with the file and byte of the first altered record, and exit 1."""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import structlog

from fswatchaudit.cli import main
from fswatchaudit.events import Event, Marker
from fswatchaudit.sinks import integrity
from fswatchaudit.sinks.heads import parse_line
from fswatchaudit.sinks.integrity import Chain, check_heads, keygen, read_key, verify
from fswatchaudit.sinks.memory import ListSink
from fswatchaudit.sinks.reader import rotated_files
from fswatchaudit.sinks.rotating import RotatingFileSink


@pytest.fixture(autouse=True)
def keep_logging_config():
    """main() sets structlog up on the captured stderr: put the old set-up back, so
    that later tests do not log into a closed file."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def write_log(d, key_file: str | None, n: int = 60, start: int = 0,
              heads: ListSink | None = None) -> list[str]:
    chain = Chain(key_file, seal_interval=0.0)          # a seal after every write
    sink = RotatingFileSink(str(d / "audit.log"), {"host": "h", "start": time.time_ns()},
                            flush_interval=0.02,
                            rotate_size=2500, integrity=chain)
    if heads is not None:
        sink.heads_to = [heads]
    for i in range(start, start + n):
        sink.write(Event(op="create", path=f"/srv/file-{i:04d}", backend="inotify", seq=i))
        if i % 10 == 0:
            time.sleep(0.05)
    sink.close()
    return rotated_files(str(d / "audit.log"))


@pytest.fixture
def sealed(tmp_path):
    d = tmp_path / "log"
    d.mkdir(mode=0o700)
    keygen(str(tmp_path / "k" / "seal.key"), str(tmp_path / "verify.key"))
    files = write_log(d, str(tmp_path / "k" / "seal.key"))
    assert len(files) >= 3
    return files, str(tmp_path / "verify.key")


def spans(path: str) -> list[tuple[int, int, dict]]:
    return integrity._records(path)[1]


def rewrite(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def check(files, key, expect_file: str, expect_byte: int | None, word: str = "") -> str:
    v = verify(files, read_key(key))
    assert not v.ok
    assert v.problem.startswith(f"{expect_file}: byte ")
    if expect_byte is not None:
        assert v.problem.startswith(f"{expect_file}: byte {expect_byte}:"), v.problem
    assert word in v.problem
    assert main(["log", "verify", *files, "--key", key]) == 1
    return v.problem


def test_untouched_logs_pass(sealed, tmp_path, capsys):
    files, key = sealed
    v = verify(files, read_key(key))
    assert v.ok and v.keyed_seals == v.seals > 3, v
    assert verify(files).ok                               # chain only, without the key
    assert main(["log", "verify", files[-1], "--all", "--key", key]) == 0
    assert "chain intact" in capsys.readouterr().out
    assert os.stat(tmp_path / "k" / "seal.key").st_mode & 0o777 == 0o600
    state = read_key(str(tmp_path / "k" / "seal.key"))
    assert state.epoch == v.seals and state.key != read_key(key).key   # evolved


def test_edit_a_byte_inside_a_record(sealed):
    files, key = sealed
    target = files[1]
    start, end, obj = spans(target)[5]
    data = bytearray(open(target, "rb").read())
    at = data.index(b"file-", start) + 5
    data[at] ^= 0x01                                      # 0 -> 1 in the name
    rewrite(target, bytes(data))
    check(files, key, target, start, "edited")
    assert not verify(files).ok                           # the chain alone sees it


def test_delete_a_record(sealed):
    files, key = sealed
    target = files[0]
    recs = spans(target)
    s, e, _ = recs[4]
    data = open(target, "rb").read()
    rewrite(target, data[:s] + data[e:])
    check(files, key, target, s, "deleted")


def test_swap_two_records(sealed):
    files, key = sealed
    target = files[1]
    recs = spans(target)
    (s1, e1, _), (s2, e2, _) = recs[3], recs[4]
    data = open(target, "rb").read()
    rewrite(target, data[:s1] + data[s2:e2] + data[s1:e1] + data[e2:])
    check(files, key, target, s1)


def test_truncate(sealed):
    files, key = sealed
    target = files[-1]
    recs = spans(target)
    data = open(target, "rb").read()
    rewrite(target, data[:recs[-3][1]])                    # at a record boundary
    check(files, key, target, None, "closing seal")
    rewrite(target, data[:recs[-3][1] + 7])                # inside a record
    check(files, key, target, recs[-3][1], "truncated")
    # a file cut in the middle of a rotated set
    rewrite(files[0], open(files[0], "rb").read()[:spans(files[0])[-4][1]])
    check(files, key, files[0], None)


def test_remove_the_last_seal(sealed):
    files, key = sealed
    target = files[-1]
    s, e, obj = spans(target)[-1]
    assert obj["t"] == "seal" and obj["final"]
    rewrite(target, open(target, "rb").read()[:s])
    # named: the first record that no seal covers any more
    problem = check(files, key, target, None, "closing seal")
    assert int(problem.split("byte ")[1].split(":")[0]) < s
    assert not verify(files).ok                           # also without the key


def test_replace_a_whole_file(sealed, tmp_path):
    files, key = sealed
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    keygen(str(tmp_path / "k2" / "seal.key"), str(tmp_path / "k2.verify"))
    fake = write_log(other, str(tmp_path / "k2" / "seal.key"), n=20)
    shutil.copy(fake[-1], files[1])                       # a well-formed file, wrong key
    check(files, key, files[1], None)
    # without the key the chain across files still shows it
    v = verify(files)
    assert not v.ok and v.problem.startswith(files[1] + ": byte 0:"), v.problem


def test_rewritten_tail_with_fresh_seals_needs_the_key(sealed, tmp_path):
    """A consistent rewrite (chain recomputed, seals made with another key) passes
    the keyless chain check at the records but not the keyed one."""
    files, key = sealed
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    fake = write_log(other, None, n=15)
    for f in files:
        os.unlink(f)
    shutil.copy(fake[-1], files[-1])
    assert verify([files[-1]]).ok                         # chain alone: consistent
    assert not verify([files[-1]], read_key(key)).ok      # seals: not this key's


def test_chain_without_key(tmp_path):
    d = tmp_path / "log"
    d.mkdir(mode=0o700)
    files = write_log(d, None, n=30)
    assert verify(files).ok
    assert not verify(files, None).problem
    target = files[-1]
    s, e, _ = spans(target)[3]
    data = bytearray(open(target, "rb").read())
    data[data.index(b"file-", s) + 6] ^= 0x02
    rewrite(target, bytes(data))
    v = verify(files)
    assert not v.ok and f"byte {s}:" in v.problem


def test_restart_continues_the_chain(sealed, tmp_path):
    files, key = sealed
    d = os.path.dirname(files[-1])
    from pathlib import Path
    files2 = write_log(Path(d), str(tmp_path / "k" / "seal.key"), n=10, start=500)
    v = verify(files2, read_key(key))
    assert v.ok, v.problem


def test_keygen_cli(tmp_path, capsys):
    kf = str(tmp_path / "keys" / "seal.key")
    assert main(["log", "keygen", "--key-file", kf]) == 0
    line = capsys.readouterr().out
    assert line.startswith("fswatchaudit-verify-key v1 ")
    assert os.stat(kf).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "keys").st_mode & 0o777 == 0o700
    assert main(["log", "keygen", "--key-file", kf]) == 1        # never overwritten silently
    assert read_key(kf).kid == integrity.KeyState.parse(line).kid


def test_heads_sent_out_show_a_cut_tail_and_missing_or_replaced_files(tmp_path):
    d = tmp_path / "log"
    d.mkdir(mode=0o700)
    sent = ListSink()
    files = write_log(d, None, heads=sent)
    heads = [m.to_dict() for m in sent.records]
    assert all(isinstance(m, Marker) and m.what == "head" for m in sent.records)
    # each file's last head is its closing seal (rotation, close)
    last = {}
    for h in heads:
        last[h["part"]] = h["seq"]
    assert sorted(last.values()) == sorted(len(spans(f)) for f in files)
    assert check_heads(files, heads).ok
    assert verify(files).ok
    whole = open(files[-1], "rb").read()
    cut = spans(files[-1])[-3][0]                       # the last 3 records cut off
    rewrite(files[-1], whole[:cut])
    v = check_heads(files, heads)
    n = len(spans(files[-1]))
    assert not v.ok and f"{files[-1]}: log truncated after seq {n} " in v.problem
    assert f"the remote head says {n + 3}" in v.problem
    rewrite(files[-1], whole)
    v = check_heads(files[:-1], heads)                  # the newest file deleted
    assert not v.ok and "none of them holds: deleted or replaced" in v.problem
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    v = check_heads(write_log(other, None, n=5), heads)     # a log put in its place
    assert not v.ok and "the log was replaced" in v.problem
    v = check_heads(files, [dict(h, host="elsewhere") for h in heads])
    assert not v.ok and "no chain heads of host h" in v.problem
    assert main(["log", "verify", *files, "--heads", str(tmp_path / "nosuch")]) == 2
    (tmp_path / "none.jsonl").write_text("")
    assert main(["log", "verify", *files, "--heads", str(tmp_path / "none.jsonl")]) == 2


def test_heads_are_read_from_each_receivers_form():
    from fswatchaudit.sinks.syslog import format_5424
    head = {"host": "web-01", "part": "ab" * 32, "seq": 41, "h": "cd" * 32}
    marker = Marker("head", dict(head))
    forms = [
        json.dumps(marker.to_dict()),                               # our JSON map
        json.dumps({"MESSAGE": "# head", "FSWATCHAUDIT_RECORD": "mark",   # journalctl
                    "FSWATCHAUDIT_WHAT": "head", "FSWATCHAUDIT_HOST": "web-01",
                    "FSWATCHAUDIT_PART": "ab" * 32, "FSWATCHAUDIT_SEQ": "41",
                    "FSWATCHAUDIT_H": "cd" * 32}),
        format_5424(marker, 10, "web-01").decode(),                 # as sent to syslog
        "imtcp|fswatchaudit|mark|" + json.dumps(                    # rsyslog mmpstrucdata
            {"fswatchaudit@32473": {k: str(v) for k, v in
                                    {"what": "head", **head}.items()}}),
    ]
    for line in forms:
        assert parse_line(line) == head, line
    for line in ("", "not a head", json.dumps(Marker("stop", {"seq": 1}).to_dict()),
                 json.dumps({"t": "mark", "what": "head", "seq": "x"})):
        assert parse_line(line) is None
