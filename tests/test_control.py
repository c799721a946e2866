"""The control socket: framing, root-only access (modes and SO_PEERCRED), and the
auditctl-style options of `fswatchaudit ctl` turned into rule lines."""
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import msgpack
import pytest

from fswatchaudit import cli, rules
from fswatchaudit.cli import ctl
from fswatchaudit.service import control

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def echo_handler(req):
    return {"ok": True, "echo": req}


@pytest.fixture
def server():
    # under /tmp itself: pytest's tmp_path sits in a 0700 directory nobody cannot enter
    base = tempfile.mkdtemp(prefix="fswa-control-", dir="/tmp")
    os.chmod(base, 0o755)
    srv = control.ControlServer(os.path.join(base, "run", "control.sock"), echo_handler,
                                timeout=5)
    srv.start()
    yield srv
    srv.close()
    shutil.rmtree(base)


def as_nobody(code: str) -> subprocess.CompletedProcess:
    """Run python code as uid/gid 65534 with no supplementary groups."""
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", "--", sys.executable, "-c", code],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_frames_round_trip():
    a, b = socket.socketpair()
    with a, b:
        control.send_frame(a, {"op": "add", "rule": "-w /srv", "n": [1, 2]})
        assert control.recv_frame(b) == {"op": "add", "rule": "-w /srv", "n": [1, 2]}
        a.shutdown(socket.SHUT_WR)
        assert control.recv_frame(b) is None


def test_bad_frames_are_refused():
    a, b = socket.socketpair()
    with a, b:
        a.sendall((control.MAX_FRAME + 1).to_bytes(4, "big"))
        with pytest.raises(control.ProtocolError, match="exceeds"):
            control.recv_frame(b)
    a, b = socket.socketpair()
    with a, b:
        body = msgpack.packb([1, 2])
        a.sendall(len(body).to_bytes(4, "big") + body)
        with pytest.raises(control.ProtocolError, match="map"):
            control.recv_frame(b)
    a, b = socket.socketpair()
    with a, b:
        a.sendall((10).to_bytes(4, "big") + b"abc")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(control.ProtocolError, match="middle of a frame"):
            control.recv_frame(b)


def test_socket_is_root_only(server):
    st = os.lstat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == 0
    dst = os.lstat(os.path.dirname(server.path))
    assert stat.S_IMODE(dst.st_mode) == 0o700 and dst.st_uid == 0
    assert control.request(server.path, {"op": "status"}) == \
        {"ok": True, "echo": {"op": "status"}}


def test_non_root_peer_is_refused(server):
    code = (f"import sys; sys.path.insert(0, {REPO!r})\n"
            "from fswatchaudit.service import control\n"
            "try:\n"
            f"    print(control.request({server.path!r}, {{'op': 'list'}}))\n"
            "except PermissionError:\n"
            "    print('EACCES')\n")
    # The modes keep an unprivileged user out before the daemon is even reached...
    out = as_nobody(code)
    assert out.stdout.strip() == "EACCES", out.stderr
    # ...and with the modes loosened, the peer credentials still do.
    os.chmod(os.path.dirname(server.path), 0o711)
    os.chmod(server.path, 0o666)
    out = as_nobody(code)
    assert out.stdout.strip() == \
        "{'ok': False, 'error': 'permission denied: root only'}", out.stderr
    assert server.refused == 1
    # root is still served afterwards
    assert control.request(server.path, {"op": "x"})["ok"]


def test_several_requests_on_one_connection(server):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(server.path)
        for n in range(3):
            control.send_frame(s, {"op": "status", "n": n})
            assert control.recv_frame(s)["echo"]["n"] == n


def test_stale_socket_is_replaced_live_one_refused(tmp_path):
    path = str(tmp_path / "run" / "c.sock")
    first = control.ControlServer(path, echo_handler)
    first.start()
    with pytest.raises(OSError, match="another daemon is listening"):
        control.ControlServer(path, echo_handler)
    first.close()                # a daemon that died without cleaning up...
    first.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.sock.bind(path)        # ...leaves its socket file behind
    first.sock.close()
    second = control.ControlServer(path, echo_handler)
    second.start()
    assert control.request(path, {"op": "status"})["ok"]
    second.close()
    assert not os.path.exists(path)


def test_symlinked_directory_is_not_followed(tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    os.symlink(real, tmp_path / "run")
    with pytest.raises(OSError, match="not a directory"):
        control.ControlServer(str(tmp_path / "run" / "c.sock"), echo_handler)
    assert os.listdir(real) == []


def test_non_socket_in_the_way_is_not_removed(tmp_path):
    (tmp_path / "run").mkdir(mode=0o700)
    victim = tmp_path / "run" / "c.sock"
    victim.write_text("keep me")
    with pytest.raises(OSError, match="not a socket"):
        control.ControlServer(str(victim), echo_handler)
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize("argv, op, line", [
    (["-w", "/srv", "-p", "wa", "-k", "srv"], "add", "-w /srv -p wa -k srv"),
    (["-W", "/srv", "-p", "wa", "-k", "srv"], "delete", "-W /srv -p wa -k srv"),
    (["-a", "always,exit", "-F", "dir=/srv", "-S", "fs-create"], "add",
     "-a always,exit -F dir=/srv -S fs-create"),
    (["-d", "always,exit", "-F", "dir=/srv", "-S", "fs-create", "-k", "a b"], "delete",
     "-d always,exit -F dir=/srv -S fs-create -k 'a b'"),
    (["-a", "exit,always", "-S", "unlink", "-F", "path=/srv/x y", "-F", "perm=wa"], "add",
     "-a exit,always -F 'path=/srv/x y' -F perm=wa -S unlink"),
])
def test_ctl_options_become_rule_lines(argv, op, line):
    args = cli.build_parser().parse_args(["ctl", *argv])
    assert ctl.rule_text(args) == (op, line)
    # the daemon gets the rule that the same text in a rules file gives
    cmd = rules.parse_line(line)
    assert cmd.action == op
    assert cmd.rule == rules.parse_line(shlex.join(argv)).rule


# -- the socket's directory: created 0700, or an existing one checked and left alone --

def _root_dir(tmp_path, mode: int):
    d = tmp_path / "run"
    d.mkdir()
    os.chmod(d, mode)
    return d


@pytest.mark.parametrize("mode", [0o755, 0o711, 0o700, 0o1755], ids=lambda m: f"{m:04o}")
def test_existing_directory_mode_is_left_alone(tmp_path, mode):
    d = _root_dir(tmp_path, mode)
    srv = control.ControlServer(str(d / "c.sock"), echo_handler)
    srv.start()
    try:
        assert stat.S_IMODE(os.lstat(d).st_mode) == mode
        st = os.lstat(d / "c.sock")
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert control.request(srv.path, {"op": "status"})["ok"]
    finally:
        srv.close()
    assert stat.S_IMODE(os.lstat(d).st_mode) == mode
    assert os.listdir(d) == []


def test_socket_is_born_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        srv = control.ControlServer(str(tmp_path / "run" / "c.sock"), echo_handler)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.lstat(srv.path).st_mode) == 0o600
        assert stat.S_IMODE(os.lstat(tmp_path / "run").st_mode) == 0o700
    finally:
        srv.close()


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o1777, 0o770], ids=lambda m: f"{m:04o}")
def test_directory_writable_by_others_is_refused(tmp_path, mode):
    d = _root_dir(tmp_path, mode)
    with pytest.raises(OSError, match="writable by group or others") as exc:
        control.ControlServer(str(d / "c.sock"), echo_handler)
    assert f"{mode:04o}" in str(exc.value)
    assert stat.S_IMODE(os.lstat(d).st_mode) == mode
    assert os.listdir(d) == []


def test_directory_owned_by_someone_else_is_refused(tmp_path):
    d = _root_dir(tmp_path, 0o755)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(OSError, match=f"owned by uid {NOBODY}, not root"):
        control.ControlServer(str(d / "c.sock"), echo_handler)
    st = os.lstat(d)
    assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == NOBODY
    assert os.listdir(d) == []


def test_symlink_to_a_safe_directory_is_refused_and_it_is_left_alone(tmp_path):
    real = _root_dir(tmp_path, 0o755)
    os.symlink(real, tmp_path / "link")
    with pytest.raises(OSError, match="symlink is not followed"):
        control.ControlServer(str(tmp_path / "link" / "c.sock"), echo_handler)
    assert stat.S_IMODE(os.lstat(real).st_mode) == 0o755
    assert os.listdir(real) == []


def daemon_config(base, sockdir) -> str:
    os.makedirs(os.path.join(base, "rules.d"), exist_ok=True)
    os.makedirs(os.path.join(base, "w"), exist_ok=True)
    with open(os.path.join(base, "rules.d", "10.rules"), "w") as fh:
        fh.write(f"-w {base}/w -p wa -k w\n")
    conf = os.path.join(base, "fswatchaudit.conf")
    with open(conf, "w") as fh:
        fh.write(f"rules_dir = {base}/rules.d\nlog_dir = {base}/log\nbackend = inotify\n"
                 f"control_socket = {sockdir}/c.sock\nspace_left = 0\n")
    return conf


def run_daemon(conf: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    return subprocess.Popen([sys.executable, "-m", "fswatchaudit", "daemon", "--config", conf],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775], ids=lambda m: f"{m:04o}")
def test_daemon_refuses_an_unsafe_socket_directory(tmp_path, mode):
    sockdir = _root_dir(tmp_path, mode)
    proc = run_daemon(daemon_config(str(tmp_path), sockdir))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert f"cannot use the control socket {sockdir}/c.sock: control socket directory " \
        f"is writable by group or others (mode {mode:04o})" in err
    assert "Traceback" not in err
    assert stat.S_IMODE(os.lstat(sockdir).st_mode) == mode
    assert os.listdir(sockdir) == []


def test_daemon_in_an_existing_directory_serves_ctl_past_idle_clients(tmp_path):
    """The daemon end to end: /run-like directory left 0755 through start and stop, and
    `ctl -s` answered at once while 20 idle root connections are held open."""
    sockdir = _root_dir(tmp_path, 0o755)
    path = str(sockdir / "c.sock")
    proc = run_daemon(daemon_config(str(tmp_path), sockdir))
    idle = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if control.request(path, {"op": "status"}, timeout=5)["ok"]:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the daemon did not come up"
            time.sleep(0.05)
        assert stat.S_IMODE(os.lstat(sockdir).st_mode) == 0o755
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            idle.append(s)
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "fswatchaudit", "ctl", "--socket", path,
                              "-s"], cwd=REPO, capture_output=True, text=True, timeout=30)
        took = time.monotonic() - t0
        assert out.returncode == 0, out.stderr
        assert "state: running" in out.stdout.splitlines()
        assert took < 5  # the interpreter's start; the request itself is timed below
        assert timed_status(path) < 1.0
        proc.terminate()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        for s in idle:
            s.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert stat.S_IMODE(os.lstat(sockdir).st_mode) == 0o755
    assert os.listdir(sockdir) == []


# -- serving: idle, slow and greedy clients hold up no one ------------------------------

@pytest.fixture
def fast_server(tmp_path):
    """A server with a short timeout, and a way to open raw connections to it."""
    conns: list[socket.socket] = []
    srv = control.ControlServer(str(tmp_path / "run" / "c.sock"), echo_handler,
                                timeout=0.5)
    srv.start()

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(srv.path)
        conns.append(s)
        return s

    srv.connect = connect
    yield srv
    srv.close()
    for s in conns:
        s.close()


def timed_status(path: str) -> float:
    t0 = time.monotonic()
    reply = control.request(path, {"op": "status"}, timeout=5)
    assert reply["ok"] and reply.get("echo", {"op": "status"}) == {"op": "status"}
    return time.monotonic() - t0


def ctl_status(path: str, capsys) -> float:
    """`fswatchaudit ctl -s` in this process (a subprocess would time Python's start)."""
    args = cli.build_parser().parse_args(["ctl", "--socket", path, "-s"])
    t0 = time.monotonic()
    assert args.func(args) == 0
    took = time.monotonic() - t0
    assert capsys.readouterr().err == ""
    return took


def test_idle_connections_do_not_block_ctl(server, capsys):
    idle = []
    try:
        for _ in range(40):  # more than the listen backlog of the old server (16)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(server.path)
            idle.append(s)
        half = idle[0]
        half.sendall((100).to_bytes(4, "big") + b"\x81")  # half a request, then nothing
        assert ctl_status(server.path, capsys) < 1.0
        assert timed_status(server.path) < 1.0
        # the idle connections are still open and usable
        control.send_frame(idle[-1], {"op": "list"})
        assert control.recv_frame(idle[-1]) == {"ok": True, "echo": {"op": "list"}}
    finally:
        for s in idle:
            s.close()


def test_stalled_request_is_dropped_after_the_timeout(fast_server):
    s = fast_server.connect()
    s.settimeout(5)
    s.sendall((100).to_bytes(4, "big") + b"\x81\xa2op")  # half a request, then a stall
    t0 = time.monotonic()
    assert timed_status(fast_server.path) < 0.3  # others are served meanwhile
    assert s.recv(1) == b""                      # then the staller is dropped
    assert 0.3 < time.monotonic() - t0 < 2.5
    assert fast_server.dropped == 1


def test_trickling_request_is_dropped_too(fast_server):
    """The timeout is for the whole request, not each read: a byte now and then does
    not keep a connection alive."""
    s = fast_server.connect()
    s.settimeout(5)
    t0 = time.monotonic()
    with pytest.raises(OSError):
        s.sendall((1000).to_bytes(4, "big"))
        for _ in range(50):
            s.send(b"\x00")
            time.sleep(0.1)
        pytest.fail("a trickling client was never dropped")
    assert time.monotonic() - t0 < 2.5


def test_idle_connection_is_closed_after_the_timeout_then_replaced(fast_server):
    s = fast_server.connect()
    s.settimeout(5)
    t0 = time.monotonic()
    assert s.recv(1) == b""
    assert 0.3 < time.monotonic() - t0 < 2.5
    assert fast_server.dropped == 0  # an idle client is not an error
    # a connection that keeps asking stays open past the timeout
    s = fast_server.connect()
    for n in range(6):
        control.send_frame(s, {"op": "status", "n": n})
        assert control.recv_frame(s)["echo"]["n"] == n
        time.sleep(0.2)


def test_client_not_reading_its_replies_blocks_no_one(fast_server):
    greedy = fast_server.connect()
    greedy.setblocking(False)
    frame = len(body := msgpack.packb({"op": "add", "rule": "x" * 60000})).to_bytes(4, "big")
    sent = 0
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:  # requests until the socket takes no more
        try:
            greedy.sendall(frame + body)
            sent += 1
        except BlockingIOError:
            break
    assert sent > 2
    assert timed_status(fast_server.path) < 1.0
    greedy.setblocking(True)
    greedy.settimeout(5)
    t0 = time.monotonic()
    with pytest.raises(OSError):   # dropped once it left a reply unread for the timeout
        while greedy.recv(1 << 20):
            pass
        raise ConnectionResetError
    assert time.monotonic() - t0 < 3


def test_oversized_request_gets_an_error_reply(server):
    big = {"op": "add", "rule": "x" * control.MAX_REQUEST}
    reply = control.request(server.path, big)
    assert reply == {"ok": False, "error": f"request of {len(msgpack.packb(big))} bytes "
                     f"exceeds the limit of {control.MAX_REQUEST}"}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(server.path)
        s.sendall((control.MAX_FRAME).to_bytes(4, "big"))  # only announced
        assert control.recv_frame(s)["error"].startswith(f"request of {control.MAX_FRAME}")
        assert s.recv(1) == b""
    assert timed_status(server.path) < 1.0


def test_bad_request_gets_an_error_reply(server):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(server.path)
        body = msgpack.packb([1, 2])
        s.sendall(len(body).to_bytes(4, "big") + body)
        assert control.recv_frame(s) == \
            {"ok": False, "error": "bad request: a frame must hold a map"}
        assert s.recv(1) == b""


def test_failing_handler_and_unencodable_reply_are_answered(tmp_path):
    def handler(req):
        if req["op"] == "boom":
            raise RuntimeError("kaput")
        return {"ok": True, "value": object()}

    srv = control.ControlServer(str(tmp_path / "run" / "c.sock"), handler)
    srv.start()
    try:
        assert control.request(srv.path, {"op": "boom"}) == \
            {"ok": False, "error": "internal error: kaput"}
        reply = control.request(srv.path, {"op": "other"})
        assert not reply["ok"] and reply["error"].startswith("internal error: reply not sent")
    finally:
        srv.close()


def test_full_house_closes_the_longest_idle(tmp_path):
    srv = control.ControlServer(str(tmp_path / "run" / "c.sock"), echo_handler,
                                max_connections=4)
    srv.start()
    held = []
    try:
        for _ in range(4):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(srv.path)
            held.append(s)
            time.sleep(0.05)  # an order of arrival
        assert timed_status(srv.path) < 1.0
        assert held[0].recv(1) == b""      # the oldest idle one made room
        control.send_frame(held[1], {"op": "list"})
        assert control.recv_frame(held[1])["ok"]
    finally:
        for s in held:
            s.close()
        srv.close()


def test_requests_are_handled_one_at_a_time(tmp_path):
    busy = threading.Lock()
    overlaps = []

    def handler(req):
        if not busy.acquire(blocking=False):
            overlaps.append(req)
            return {"ok": False}
        try:
            time.sleep(0.001)
            return {"ok": True, "n": req["n"]}
        finally:
            busy.release()

    srv = control.ControlServer(str(tmp_path / "run" / "c.sock"), handler)
    srv.start()
    errors = []

    def client(k):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(srv.path)
                for n in range(20):
                    control.send_frame(s, {"op": "status", "n": (k, n)})
                    assert control.recv_frame(s) == {"ok": True, "n": [k, n]}
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        srv.close()
    assert errors == [] and overlaps == []


def test_pipelined_requests_are_answered_in_order(server):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(server.path)
        s.sendall(b"".join(len(b := msgpack.packb({"op": "status", "n": n})).to_bytes(4, "big")
                           + b for n in range(500)))
        for n in range(500):
            assert control.recv_frame(s)["echo"]["n"] == n


def test_close_with_connections_open_is_prompt(tmp_path):
    srv = control.ControlServer(str(tmp_path / "run" / "c.sock"), echo_handler)
    srv.start()
    held = []
    for _ in range(10):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(srv.path)
        held.append(s)
    held[0].sendall(b"\x00\x00")
    t0 = time.monotonic()
    srv.close()
    assert time.monotonic() - t0 < 1.0
    assert not os.path.exists(srv.path)
    try:
        assert held[0].recv(1) == b""
    except ConnectionResetError:
        pass  # closed before its bytes were read
    for s in held[1:]:
        assert s.recv(1) == b""
    for s in held:
        s.close()
