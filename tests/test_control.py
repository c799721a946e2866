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
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from fswatchaudit.service import control\n"
            "try:\n"
            "    print(control.request(%r, {'op': 'list'}))\n"
            "except PermissionError:\n"
            "    print('EACCES')\n" % (REPO, server.path))
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
