"""The evasion cases of fswatchaudit.capabilities (hard links, bind mounts, mounts
below, /proc/self/fd, open_by_handle_at, depth), driven on the fanotify and inotify
backends: what the table claims is what the backend does, both ways."""
import ctypes
import os
import shutil
import subprocess
import tempfile
import time

import pytest
from tracehelp import drain

from fswatchaudit.backends import backend_class, probe
from fswatchaudit.capabilities import CAPABILITIES
from fswatchaudit.rules import RuleSet, watch_rule

_libc = ctypes.CDLL(None, use_errno=True)


def touch(path):
    open(path, "w").close()


def write_by_handle(path):
    """Open an existing file for write with open_by_handle_at and write to it."""
    handle = ctypes.create_string_buffer(8 + 128)
    ctypes.c_uint.from_buffer(handle, 0).value = 128
    mount_id = ctypes.c_int()
    assert _libc.name_to_handle_at(-100, path.encode(), handle, ctypes.byref(mount_id),
                                   0) == 0, ctypes.get_errno()
    mount_fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        fd = _libc.open_by_handle_at(mount_fd, handle, os.O_WRONLY)
        assert fd >= 0, ctypes.get_errno()
        os.write(fd, b"z")
        os.close(fd)
    finally:
        os.close(mount_fd)


def chmod_through_proc_fd(path):
    fd = os.open(path, os.O_PATH)
    try:
        os.chmod(f"/proc/self/fd/{fd}", 0o600)
    finally:
        os.close(fd)


def mount(*args):
    subprocess.run(["mount", *args], check=True)


DEEP = "/d" * 40


# case: (field, setup(w, o, base), act(w, o, base), expected (op, path) when reported)
CASES = {
    "hard link": ("hard_links",
                  lambda w, o, b: (touch(f"{w}/f"), os.link(f"{w}/f", f"{o}/hl")),
                  lambda w, o, b: (open(f"{o}/hl", "a").write("x"),
                                   os.chmod(f"{o}/hl", 0o600)),
                  [("open", "{W}/f"), ("attr", "{W}/f")]),
    "bind mount": ("bind_mounts",
                   lambda w, o, b: (touch(f"{w}/f"), os.mkdir(f"{b}/bind"),
                                    mount("--bind", w, f"{b}/bind")),
                   lambda w, o, b: (touch(f"{b}/bind/new"), os.chmod(f"{b}/bind/f", 0o600)),
                   [("create", "{W}/new"), ("attr", "{W}/f")]),
    "mount below": ("mounts_below",
                    lambda w, o, b: (os.mkdir(f"{w}/mnt"),
                                     mount("-t", "tmpfs", "fswa", f"{w}/mnt")),
                    lambda w, o, b: (os.mkdir(f"{w}/mnt/d"), touch(f"{w}/mnt/x"),
                                     os.chmod(f"{w}/mnt/x", 0o600),
                                     os.rename(f"{w}/mnt/x", f"{w}/mnt/y"),
                                     os.unlink(f"{w}/mnt/y")),
                    [("mkdir", "{W}/mnt/d"), ("create", "{W}/mnt/x"), ("attr", "{W}/mnt/x"),
                     ("rename", "{W}/mnt/x"), ("unlink", "{W}/mnt/y")]),
    "mount below, later": ("later_mounts",
                           lambda w, o, b: os.mkdir(f"{w}/mnt"),
                           lambda w, o, b: (mount("-t", "tmpfs", "fswa", f"{w}/mnt"),
                                            time.sleep(0.3), touch(f"{w}/mnt/x"),
                                            os.chmod(f"{w}/mnt/x", 0o600)),
                           [("create", "{W}/mnt/x"), ("attr", "{W}/mnt/x")]),
    "/proc/self/fd": ("proc_fd",
                      lambda w, o, b: touch(f"{w}/f"),
                      lambda w, o, b: chmod_through_proc_fd(f"{w}/f"),
                      [("attr", "{W}/f")]),
    "open_by_handle_at": ("open_by_handle",
                          lambda w, o, b: touch(f"{w}/f"),
                          lambda w, o, b: write_by_handle(f"{w}/f"),
                          [("open", "{W}/f")]),
    "deep tree": ("deep_trees",
                  lambda w, o, b: os.makedirs(w + DEEP),
                  lambda w, o, b: touch(w + DEEP + "/f"),
                  [("create", "{W}" + DEEP + "/f")]),
}


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts and open_by_handle_at need root")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["fanotify", "inotify"])
def test_capability_table_tells_the_truth(backend, case):
    found = probe(backend)
    if not found.usable:
        pytest.skip(f"{backend}: {found.reason}")
    field, setup, act, reported = CASES[case]
    base = tempfile.mkdtemp(prefix="fswa-evasion-", dir="/tmp")
    w, o = f"{base}/w", f"{base}/o"
    os.mkdir(w)
    os.mkdir(o)
    be = None
    try:
        setup(w, o, base)
        rules = RuleSet()
        rules.add(watch_rule(w))
        be = backend_class(backend)(rules)
        be.start()
        act(w, o, base)
        got = [(e.op, e.path) for e in drain(be)]
        want = [(op, path.format(W=w)) for op, path in reported]
        if getattr(CAPABILITIES[backend], field):
            assert got == want, f"{backend} claims {field} but reported {got}"
        else:
            assert got != want, f"{backend} reports {case} ({got}): claim {field}"
    finally:
        if be is not None:
            be.close()
        subprocess.run(["umount", "-R", f"{w}/mnt"], capture_output=True)
        subprocess.run(["umount", "-R", f"{base}/bind"], capture_output=True)
        shutil.rmtree(base)
