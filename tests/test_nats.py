"""The NATS JetStream sink against real nats-server processes on 127.0.0.1: a server
restart and a cluster node killed in the middle of a flood lose and double nothing;
the spool keeps records across a run with no server at all."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import msgpack
import pytest
from receivers import NATS_SERVER, NatsServer, free_port
from tracehelp import REPO, Trace

from fswatchaudit.events import Event, LostCounts
from fswatchaudit.sinks.nats import NatsSink, Spool, subject_token, token_text
from fswatchaudit.sinks.nats_reader import iter_stream, message_records

pytestmark = pytest.mark.skipif(not os.access(NATS_SERVER, os.X_OK),
                                reason="nats-server is not installed (scripts/setup)")


def event(i: int, run: int = 1) -> Event:
    """Records whose key changes every ``run`` records (no key, k1, k2, ...)."""
    k = i // run % 3
    keys = [] if k == 0 else [f"k{k}"]
    return Event(op="create", path=f"/srv/f{i}", backend="inotify", seq=i, time=i,
                 aliases=["fs-create"], keys=keys)


def stream_count(url: str, stream: str = "FSWATCHAUDIT") -> int:
    async def count() -> int:
        import nats
        nc = await nats.connect(servers=[url], allow_reconnect=False)
        try:
            for _ in range(100):        # a cluster may be electing a stream leader
                try:
                    return (await nc.jetstream().stream_info(stream)).state.messages
                except Exception:
                    await asyncio.sleep(0.2)
            raise AssertionError("stream info unavailable")
        finally:
            await nc.close()
    return asyncio.run(count())


def stored_records(url: str, stream: str = "FSWATCHAUDIT") -> list:
    """Every record the stream's messages hold, duplicates included, as the reader
    decodes a message: (record id, subject, map)."""
    async def read() -> list:
        import nats
        import nats.errors
        from nats.js import api
        nc = await nats.connect(servers=[url], allow_reconnect=False)
        try:
            js = nc.jetstream(timeout=5)
            config = api.ConsumerConfig(ack_policy=api.AckPolicy.NONE)
            for attempt in range(10):       # a cluster may be electing a stream leader
                try:
                    sub = await js.pull_subscribe("fswatchaudit.>", stream=stream,
                                                  config=config)
                    break
                except nats.errors.TimeoutError:
                    if attempt == 9:
                        raise
            left = (await sub.consumer_info()).num_pending
            out = []
            while left:
                for msg in await sub.fetch(min(left, 256), timeout=10):
                    out += [(rid, msg.subject, data) for rid, data in message_records(msg)]
                    left -= 1
            return out
        finally:
            await nc.close()
    return asyncio.run(read())


def flood(sink: NatsSink, n: int, at: int, action, run: int = 1) -> list[dict]:
    """Write n records (a lost-count record first), in batches of 40 when ``run`` is
    more than 1, doing ``action`` once ``at`` records are written; the maps written."""
    written = [LostCounts({"ring": 0}, time=1).to_dict()]
    sink.write(LostCounts({"ring": 0}, time=1))
    batch: list[Event] = []
    for i in range(1, n):
        ev = event(i, run)
        if run > 1:
            batch.append(ev)
            if len(batch) == 40 or i == n - 1:
                sink.write_many(batch)
                batch = []
        else:
            sink.write(ev)
        written.append(ev.to_dict())
        if i % 200 == 0:
            sink.flush()
            time.sleep(0.01)
        if i == at:
            action()
    return written


def check_stream(url: str, written: list[dict], host: str = "h1") -> None:
    stream_count(url)                                  # (waits for a stream leader)
    got = stored_records(url)
    assert len(got) == len(written)                    # nothing doubled
    ids = [int(rid.rsplit(":", 1)[1]) for rid, _, _ in got]
    assert ids == list(range(1, len(written) + 1))     # nothing lost, in order
    for (_rid, subject, data), want in zip(got, written, strict=True):
        assert data == want
        _, host_tok, key_tok = subject.split(".")
        assert token_text(host_tok) == host
        assert token_text(key_tok) == (want["keys"][0] if want.get("keys") else None)


def make_sink(servers, spool: str, **kw) -> NatsSink:
    kw.setdefault("create_stream", True)
    kw.setdefault("close_timeout", 60.0)
    return NatsSink(servers, host="h1", boot_id="b", start=7, spool_dir=spool,
                    backoff=(0.05, 0.5), ack_timeout=2.0, **kw)


def test_subject_tokens():
    for value in ("web-01", "a.b", "*", ">", "x y", "100%", "_", "caf\xe9",
                  "raw\udcff", "etc_passwd"):
        tok = subject_token(value)
        assert all(c not in tok for c in ".*> \t") and tok != "_"
        assert token_text(tok) == value
    assert subject_token(None) == "_" and token_text("_") is None
    assert subject_token("a.b") == "a%2Eb" and subject_token("etc_passwd") == "etc_passwd"


def test_spool_is_private_and_ordered(tmp_path):
    d = tmp_path / "spool"
    sp = Spool(str(d), "nats", 10_000)
    assert os.stat(d).st_mode & 0o777 == 0o700
    assert os.stat(d / "nats.spool").st_mode & 0o777 == 0o600
    assert sp.append([(f"id{i}", "s", b"x" * 100, 1) for i in range(200)]) < 200  # bounded
    n = sp.pending
    entries, end = sp.read(10)
    assert [e[0] for e in entries] == [f"id{i}" for i in range(10)]
    sp.advance(end, 10)
    sp.close()
    sp = Spool(str(d), "nats", 10_000)           # the position survives a restart
    assert sp.pending == n - 10 and sp.read(1)[0][0][0] == "id10"
    sp.close()
    # a frame as spooled before messages held several records: one record, no count
    body = msgpack.packb(["old1", "s", b"y"], use_bin_type=True)
    with open(d / "nats.spool", "ab") as fh:
        fh.write(len(body).to_bytes(4, "big") + body)
    sp = Spool(str(d), "nats", 10_000)
    assert sp.pending == n - 9
    sp.close()
    os.rename(d / "nats.spool", d / "real")
    os.symlink(d / "real", d / "nats.spool")
    with pytest.raises(OSError):
        Spool(str(d), "nats", 10_000)            # never through a symlink


def test_spool_until_the_server_comes(tmp_path):
    """No server at all: everything goes to the spool; the next run, with a server,
    publishes it first and in order."""
    server = NatsServer(str(tmp_path / "js"))
    spool = str(tmp_path / "spool")
    sink = make_sink(server.url, spool, close_timeout=1.0)
    first = [event(i) for i in range(1, 301)]
    for ev in first:
        sink.write(ev)
    sink.close()
    assert sink.stats()["spooled"] == 300 and sink.stats()["lost"] == 0
    server.start()
    try:
        sink2 = NatsSink(server.url, host="h1", boot_id="b", start=8, spool_dir=spool,
                         create_stream=True, backoff=(0.05, 0.5))
        sink2.write(event(1000))
        sink2.close()
        assert sink2.stats()["sent"] == 301 and sink2.stats()["spool_records"] == 0
        got = list(iter_stream(server.url))
        assert [r.record["seq"] for r in got] == list(range(1, 301)) + [1000]
        assert got[0].msg_id == "h1:b:7:1" and got[-1].msg_id == "h1:b:8:1"
    finally:
        server.stop()


def test_server_restart_mid_flood(tmp_path):
    server = NatsServer(str(tmp_path / "js"))
    server.start()
    sink = make_sink(server.url, str(tmp_path / "spool"))
    try:
        def restart():
            server.stop()
            threading.Timer(1.0, server.start).start()
        # keys in runs of 100: messages bundle a run's records
        written = flood(sink, 8000, 2500, restart, run=100)
        time.sleep(1.2)                         # the server is back
        sink.close()
        st = sink.stats()
        assert st["lost"] == 0 and st["spool_records"] == 0, st
        assert st["spooled"] > 0 and st["sent"] == len(written), st
        check_stream(server.url, written)
        assert stream_count(server.url) < len(written) / 10      # bundled
    finally:
        server.stop()


def test_cluster_node_killed_mid_flood(tmp_path):
    cports = [free_port() for _ in range(3)]
    nodes = [NatsServer(str(tmp_path / f"js{i}"), f"n{i}", cports[i],
                    [p for p in cports if p != cports[i]]) for i in range(3)]
    for node in nodes:
        node.start()
    try:
        sink = make_sink([n.url for n in nodes], str(tmp_path / "spool"), replicas=3)
        deadline = time.monotonic() + 30          # the cluster elects its leaders
        while sink.connected_url is None and time.monotonic() < deadline:
            time.sleep(0.1)
        killed: list[NatsServer] = []

        def kill_connected():
            victim = next(n for n in nodes if n.url == sink.connected_url)
            victim.stop(signal.SIGKILL)
            killed.append(victim)
        written = flood(sink, 6000, 2000, kill_connected)
        sink.close()
        st = sink.stats()
        assert st["lost"] == 0 and st["spool_records"] == 0, st
        survivor = next(n for n in nodes if n not in killed)
        check_stream(survivor.url, written)
    finally:
        for node in nodes:
            node.stop(signal.SIGKILL)


def _search(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fswatchaudit", "search", *args],
                          capture_output=True, cwd=REPO, timeout=60)


@pytest.mark.skipif(os.geteuid() != 0, reason="a UTS namespace per host needs root")
def test_search_reads_every_hosts_stream(tmp_path):
    """Two hosts (traces in UTS namespaces named web-01 and web-02) publish to one
    server; `search --nats` answers for both, `--host` for one, with the same filters
    as for files, and says which host each event is from."""
    server = NatsServer(str(tmp_path / "js"))
    server.start()
    try:
        made: dict[str, list[dict]] = {}
        for host in ("web-01", "web-02"):
            w = tmp_path / host
            w.mkdir()
            trace = Trace("--backend", "inotify", "-k", "fleet", "--sink",
                          f"nats:{server.url}", str(w), hostname=host)
            for n in range(5 if host == "web-01" else 3):
                (w / f"f{n}").write_bytes(b"x")
            os.mkdir(os.path.join(os.fsencode(w), b"raw\xff"))     # not UTF-8
            trace.wait_for(1)
            events, stderr, code = trace.stop()
            assert code == 0, stderr
            made[host] = events
        assert all(made.values())
        every = _search("--nats", server.url, "--json", "-k", "fleet")
        assert every.returncode == 0, every.stderr
        got = [json.loads(line) for line in every.stdout.splitlines()]
        for host, events in made.items():
            mine = [{k: v for k, v in e.items() if k != "host"} for e in got
                    if e["host"] == host]
            assert mine == events, host
        assert len(got) == sum(map(len, made.values()))
        one = _search("--nats", server.url, "--host", "web-02", "--json", "--op", "mkdir")
        assert one.returncode == 0, one.stderr
        only = [json.loads(line) for line in one.stdout.splitlines()]
        assert [e["path"] for e in only] == \
            [e["path"] for e in made["web-02"] if e["op"] == "mkdir"]
        assert {e["host"] for e in only} == {"web-02"} and only
        human = _search("--nats", server.url, "--host", "web-01", "--under",
                        str(tmp_path / "web-01"), "--color", "never")
        lines = human.stdout.decode().splitlines()
        assert len(lines) == len(made["web-01"]) and all(x.startswith("web-01 ")
                                                          for x in lines)
        assert "raw\\xff" in human.stdout.decode()           # escaped, as in files
        assert b"in the stream FSWATCHAUDIT" in human.stderr
        csv_out = _search("--nats", server.url, "--csv", "--host", "web-01")
        assert csv_out.stdout.startswith(b"host,time,")
        bad = _search("--nats", f"nats://127.0.0.1:{free_port()}")
        assert bad.returncode == 1 and b"cannot read the stream" in bad.stderr
        assert b"Traceback" not in bad.stderr
        mixed = _search("--nats", server.url, str(tmp_path / "x.log"))
        assert mixed.returncode == 2 and b"give no log files" in mixed.stderr
    finally:
        server.stop()
