"""The compiled-program cache: compiled once in a child process, loaded from the cache
with bpf(2) alone (no bcc, no LLVM in the process), checked before use, never read or
written through a symlink."""
from __future__ import annotations

import base64
import ctypes
import json
import os
import subprocess
import sys
import textwrap

import pytest
from tracehelp import REPO

from fswatchaudit.backends.ebpf import objcache
from fswatchaudit.rules import RuleSet, watch_rule


def ebpf_usable() -> None:
    from fswatchaudit.backends import probe
    p = probe("ebpf")
    if not p.usable:
        pytest.skip(f"eBPF backend: {p.reason}")


@pytest.fixture
def cache_dir(tmp_path):
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    return str(d)


def start(watch: str, cache_dir: str):
    from fswatchaudit.backends.ebpf import EbpfBackend
    rs = RuleSet()
    rs.add(watch_rule(watch, key="w"))
    be = EbpfBackend(rs, cache_dir=cache_dir)
    be.start()
    return be


def creates_seen(be, path: str) -> list[str]:
    subprocess.run(["touch", path], check=True)       # another process: not excluded
    out = []
    for _ in range(5):
        out += [e.path for e in be.read(0.2) if getattr(e, "op", None) == "create"]
        if out:
            break
    return out


def entries(cache_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(cache_dir) if n.endswith(objcache.SUFFIX))


def test_compiled_once_then_loaded_from_the_cache(tmp_path, cache_dir):
    ebpf_usable()
    w = tmp_path / "w"
    w.mkdir()
    be = start(str(w), cache_dir)
    try:
        assert be.bpf is not None and not be.bpf.cached
        assert creates_seen(be, f"{w}/a") == [f"{w}/a"]
    finally:
        be.close()
    [name] = entries(cache_dir)
    st = os.lstat(os.path.join(cache_dir, name))
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    be = start(str(w), cache_dir)
    try:
        assert be.bpf is not None and be.bpf.cached
        assert creates_seen(be, f"{w}/b") == [f"{w}/b"]
    finally:
        be.close()
    assert entries(cache_dir) == [name]          # found, not stored again


WARM_START = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from fswatchaudit.backends.ebpf import EbpfBackend
    from fswatchaudit.rules import RuleSet, watch_rule
    rs = RuleSet()
    rs.add(watch_rule(sys.argv[2]))
    be = EbpfBackend(rs, cache_dir=sys.argv[3])
    be.start()
    print(json.dumps({"cached": be.bpf.cached, "bcc": "bcc" in sys.modules,
                      "libbcc": "libbcc" in open("/proc/self/maps").read()}))
    be.close()
""")


def test_a_warm_start_maps_neither_bcc_nor_llvm(tmp_path, cache_dir):
    ebpf_usable()
    start(str(tmp_path), cache_dir).close()          # cold: fills the cache
    out = subprocess.run([sys.executable, "-c", WARM_START, REPO, str(tmp_path), cache_dir],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"cached": True, "bcc": False, "libbcc": False}


def test_a_damaged_cache_entry_is_not_used(tmp_path, cache_dir):
    ebpf_usable()
    start(str(tmp_path), cache_dir).close()
    [name] = entries(cache_dir)
    path = os.path.join(cache_dir, name)
    data = bytearray(open(path, "rb").read())
    data[-10] ^= 0x01                       # one bit of the object
    with open(path, "wb") as fh:
        fh.write(data)
    w = tmp_path / "w"
    w.mkdir()
    be = start(str(w), cache_dir)
    try:
        assert not be.bpf.cached                # compiled again
        assert creates_seen(be, f"{w}/a") == [f"{w}/a"]
    finally:
        be.close()
    assert open(path, "rb").read() != bytes(data)    # and stored again, whole


def test_a_symlink_in_the_cache_is_never_followed(tmp_path, cache_dir):
    ebpf_usable()
    start(str(tmp_path), cache_dir).close()
    [name] = entries(cache_dir)
    path = os.path.join(cache_dir, name)
    real = tmp_path / "elsewhere"
    os.rename(path, real)
    os.symlink(real, path)                  # a valid object, reached through a link
    be = start(str(tmp_path), cache_dir)
    try:
        assert not be.bpf.cached
    finally:
        be.close()
    assert not os.path.islink(path)          # replaced by a file, the target untouched
    assert real.read_bytes() != b""
    assert os.lstat(path).st_mode & 0o777 == 0o600


def test_a_cache_directory_others_may_write_is_not_used(tmp_path, cache_dir):
    ebpf_usable()
    os.chmod(cache_dir, 0o777)
    be = start(str(tmp_path), cache_dir)
    be.close()
    assert entries(cache_dir) == []


def test_key_follows_sources_flags_and_kernel():
    base = objcache.cache_key(b"int x;", ["-DA=1"])
    assert base == objcache.cache_key(b"int x;", ["-DA=1"])
    assert base != objcache.cache_key(b"int y;", ["-DA=1"])
    assert base != objcache.cache_key(b"int x;", ["-DA=2"])
    assert base != objcache.cache_key(b"int x;", ["-DA=1", ""])


def test_types_from_bcc_descriptions():
    desc = ["watch_val", [["self", "unsigned char"], ["pad", "unsigned char", [7]],
                          ["rules", "unsigned long long"], ["name", "char", [2, 3]]],
            "struct_packed"]
    t = objcache.ctype_of(desc)
    assert ctypes.sizeof(t) == 1 + 7 + 8 + 6
    assert t.rules.offset == 8
    assert objcache.ctype_of("unsigned int") is ctypes.c_uint
    with pytest.raises(objcache.ObjectError):
        objcache.ctype_of("float128")


def test_relocations_name_each_map_load():
    from fswatchaudit.backends.ebpf.build import map_relocations
    ld_map = bytes([0x18, 0x10, 0, 0]) + (7).to_bytes(4, "little") + bytes(8)
    ld_imm = bytes([0x18, 0x00, 0, 0]) + (7).to_bytes(4, "little") + bytes(8)
    exit_ = bytes([0x95]) + bytes(7)
    assert map_relocations(ld_imm + ld_map + exit_, {7: "watched"}) == [(2, "watched")]
    with pytest.raises(RuntimeError):
        map_relocations(ld_map, {8: "other"})


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_refused_program_says_why_and_leaves_nothing_open():
    ebpf_usable()
    from fswatchaudit.backends.ebpf import bpfsys, loader
    exit_only = bytes([0x95]) + bytes(7)            # exit with r0 never set
    obj = {"license": "GPL",
           "maps": [{"name": "m", "type": 2, "key_size": 4, "value_size": 8,
                     "max_entries": 1, "flags": 0, "key_desc": "int",
                     "leaf_desc": "unsigned long long"}],
           "progs": [{"name": "raw_tracepoint__sys_enter", "attach": "raw",
                      "target": "sys_enter", "relocs": [],
                      "insns": base64.b64encode(exit_only).decode()}]}
    before = open_fds()
    progs = objcache.Programs(obj, loader.tracefs() or "")
    progs[b"m"][0] = progs[b"m"].Leaf(7)            # maps work before the programs
    assert progs[b"m"][0].value == 7
    with pytest.raises(bpfsys.BPFError) as info:
        progs.attach()
    assert "R0" in info.value.log                    # the verifier's own words
    with pytest.raises(loader.BackendUnavailable, match="(?s)did not load.*R0 !read_ok"):
        loader.attach_programs(objcache.Programs(obj, loader.tracefs() or ""))
    assert open_fds() == before
