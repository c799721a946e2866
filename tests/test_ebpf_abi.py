"""The eBPF record ABI: the table in abi.py against the compiled program (root), and the
decoder on records built from that table (no root, no BPF)."""
import base64
import ctypes
import os
import re
from importlib import resources

import pytest

from fswatchaudit import ops
from fswatchaudit.backends.ebpf import abi
from fswatchaudit.backends.ebpf.abi import BASE_AS_BEFORE, EV, EXE_AS_BEFORE, OFLAG
from fswatchaudit.backends.ebpf.decode import Decoder
from fswatchaudit.events import Event, ProcessState

NR = {"openat": 257, "renameat2": 316, "unlinkat": 263, "chmod": 90}


def components(path: str | None) -> list[bytes]:
    """A path as the kernel's walk writes it: components, leaf first."""
    if not path or path == "/":
        return []
    return [p.encode() for p in reversed(path.strip("/").split("/"))]


def record(kind: int, *, base1: str | None = None, name1: str | None = None,
           base2: str | None = None, name2: str | None = None, exe: str | None = None,
           n_exe: int | None = None, **header) -> bytes:
    """struct event as the kernel sends it, built from the table's field names."""
    strings: list[bytes] = []
    strings += components(base1)
    if name1 is not None:
        strings.append(name1.encode())
    strings += components(base2)
    if name2 is not None:
        strings.append(name2.encode())
    strings += components(exe)
    data = b"".join(s + b"\0" for s in strings)
    values = {f.name: 0 for f in abi.EVENT_FIELDS if not f.is_pad}
    values.update(ktime=1000, kind=kind, pid=4242, tid=4242, ppid=1, uid=1000, euid=1000,
                  gid=1000, loginuid=1000, comm=b"touch", data_len=len(data),
                  n_base1=len(components(base1)), has_name1=int(name1 is not None),
                  n_base2=len(components(base2)), has_name2=int(name2 is not None),
                  n_exe=len(components(exe)) if n_exe is None else n_exe,
                  base_dirs=int(base1 is not None) | 2 * int(base2 is not None))
    values.update(header)
    return abi.HEADER.pack(*(values[f.name] for f in abi.EVENT_FIELDS if not f.is_pad)) + data


def decode(*records: bytes, decoder: Decoder | None = None) -> list:
    dec = decoder or Decoder()
    dec.tp_names = {nr: name for name, nr in NR.items()}
    for rec in records:
        buf = b"\xee" * 8 + rec + b"\xee" * 8      # at an offset, as in the ring
        dec.on_record(memoryview(buf), 8, len(rec))
    return dec.take()


# ---- the table itself ---------------------------------------------------------------
def test_syscall_spec_dataclass_has_the_table_fields():
    from dataclasses import fields
    assert [f.name for f in fields(abi.SyscallSpec)] == [
        f.name for f in abi.SPEC_FIELDS if not f.is_pad]


def test_probes_c_defines_nothing_the_table_defines():
    src = resources.files("fswatchaudit.backends.ebpf").joinpath("probes.c").read_text()
    generated = re.findall(r"#define (\w+)", abi.c_header())
    assert generated and not [n for n in generated if re.search(rf"#define {n}\b", src)]
    assert not re.search(r"^struct (event|syscall_spec) \{", src, re.M)
    assert abi.HEADER.size == abi.EVENT_HEADER_SIZE == 168


# ---- decoding synthetic records ---------------------------------------------------------
def test_syscall_create():
    (ev,) = decode(record(EV.SYSCALL, tp_id=NR["openat"], ret=3, dev=(8 << 20) | 1, ino=77,
                          flags=OFLAG.CREAT | OFLAG.WRONLY | (1 << abi.CREATED_FLAG_SHIFT),
                          base1="/tmp/w", name1="f", exe="/usr/bin/touch"))
    assert isinstance(ev, Event)
    assert (ev.op, ev.path, ev.path2, ev.syscall, ev.result) == (
        ops.CREATE, "/tmp/w/f", None, "openat", 0)
    assert (ev.dev, ev.ino, ev.pid, ev.comm, ev.exe) == (
        os.makedev(8, 1), 77, 4242, "touch", "/usr/bin/touch")
    assert ev.access is None and ev.backend == "ebpf" and ev.scope_keys is None


def test_cut_records_name_what_cannot_be_trusted():
    deep = "/" + "/".join(f"d{i}" for i in range(abi.PATH_DEPTH))     # one walk's worth
    got = decode(
        # the base lacks its root side (the walk stopped at PATH_DEPTH components)
        record(EV.SYSCALL, tp_id=NR["chmod"], base1=deep, name1="new", cut=1),
        # the string area filled up: the second name and the exe are missing
        record(EV.SYSCALL, tp_id=NR["renameat2"], base1="/tmp", name1="/w/a", base2="/tmp",
               cut=1, has_name2=1, n_exe=3),
        record(EV.SYSCALL, tp_id=NR["chmod"], base1="/tmp/w", name1="f"))
    assert [(e.path, e.path2, e.cut) for e in got] == [
        (f"...{deep}/new", None, ["path"]),
        ("/w/a", None, ["exe", "path2"]),
        ("/tmp/w/f", None, None)]
    assert got[1].exe is None


def test_a_record_that_cannot_be_read_is_counted_and_the_next_one_decoded():
    dec = Decoder()
    good = record(EV.SYSCALL, tp_id=NR["chmod"], base1="/tmp/w", name1="f")
    got = decode(good[:40], record(EV.SYSCALL, tp_id=NR["chmod"], base1="/tmp/w",
                                   has_name1=1, n_exe=0, data_len=5), good, decoder=dec)
    assert [e.path for e in got] == ["/tmp/w/f"]
    assert dec.undecodable == 2


def test_syscall_open_for_read_and_write():
    got = decode(record(EV.SYSCALL, tp_id=NR["openat"], ret=3, flags=OFLAG.RDWR,
                        base1="/tmp/w", name1="f"),
                 record(EV.SYSCALL, tp_id=NR["openat"], ret=3, flags=0, base1="/", name1="g"))
    assert [(e.op, e.path, e.access) for e in got] == [
        (ops.OPEN, "/tmp/w/f", "rw"), (ops.OPEN, "/g", "r")]


def test_rename_with_path2():
    (ev,) = decode(record(EV.SYSCALL, tp_id=NR["renameat2"], base1="/tmp/w", name1="a",
                          base2="/tmp/o", name2="../w/sub/b"))
    assert (ev.op, ev.path, ev.path2, ev.syscall) == (
        ops.RENAME, "/tmp/w/a", "/tmp/w/sub/b", "renameat2")


def test_unlinkat_of_a_directory_is_rmdir():
    (ev,) = decode(record(EV.SYSCALL, tp_id=NR["unlinkat"], flags=abi.AT_REMOVEDIR_FLAG,
                          base1="/tmp/w", name1="d"))
    assert (ev.op, ev.path) == (ops.RMDIR, "/tmp/w/d")


def test_exec():
    (ev,) = decode(record(EV.EXEC, base1="/usr/bin/true", exe="/usr/bin/true"))
    assert (ev.op, ev.path, ev.syscall, ev.result, ev.exe) == (
        ops.EXEC, "/usr/bin/true", None, 0, "/usr/bin/true")


def test_io_uring_records_of_one_request_merge():
    a = record(EV.URING, tp_id=36, tid=99, base1="/tmp/w")           # the directory
    b = record(EV.URING, tp_id=36, tid=99, base1="/tmp/w/f")         # the file
    c = record(EV.URING, tp_id=37, tid=99, base1="/tmp/w/d")         # the next request
    got = decode(a, b, c)
    assert [(e.op, e.path, e.syscall, e.result) for e in got] == [
        (ops.UNLINK, "/tmp/w/f", None, None), (ops.MKDIR, "/tmp/w/d", None, None)]


def test_failed_open():
    got = decode(record(EV.FAILED, tp_id=NR["openat"], ret=-13, flags=OFLAG.CREAT,
                        base1="/tmp/w", name1="f"),
                 record(EV.FAILED, tp_id=NR["openat"], ret=-1, flags=OFLAG.WRONLY,
                        base1="/tmp/w", name1="g"))
    assert [(e.op, e.path, e.result, e.access) for e in got] == [
        (ops.CREATE, "/tmp/w/f", -13, None), (ops.OPEN, "/tmp/w/g", -1, "w")]


def test_state_record_then_events_of_the_audited_child():
    dec = Decoder()
    dec.audited.add(400)
    dec.audit_keys[400] = "k"
    got = decode(record(EV.STATE, pid=500, tid=500, ppid=400, nspid=7, exe="/bin/sh"),
                 record(EV.SYSCALL, tp_id=NR["chmod"], pid=500, tid=500, ppid=400,
                        base1="/tmp", name1="x", n_exe=EXE_AS_BEFORE),
                 decoder=dec)
    st, ev = got
    assert isinstance(st, ProcessState)
    assert (st.pid, st.ppid, st.reason, st.exe, st.nspid) == (500, 400, "fork", "/bin/sh", 7)
    assert 500 in dec.audited and dec.audit_keys[500] == "k"
    assert (ev.op, ev.path, ev.exe, ev.scope_keys) == (ops.CHMOD, "/tmp/x", "/bin/sh", ("k",))


def test_exe_as_before():
    got = decode(record(EV.SYSCALL, tp_id=NR["chmod"], base1="/tmp", name1="a",
                        exe="/usr/bin/chmod"),
                 record(EV.SYSCALL, tp_id=NR["chmod"], base1="/tmp", name1="b",
                        n_exe=EXE_AS_BEFORE),
                 # a process whose record with the path was not delivered: /proc says
                 record(EV.SYSCALL, tp_id=NR["chmod"], base1="/tmp", name1="c",
                        pid=os.getpid(), n_exe=EXE_AS_BEFORE))
    assert [e.exe for e in got] == ["/usr/bin/chmod", "/usr/bin/chmod",
                                    os.readlink("/proc/self/exe")]


def test_base_as_before_is_the_threads_last_whole_base():
    dec = Decoder()
    chmod = NR["chmod"]
    got = decode(record(EV.SYSCALL, tp_id=chmod, base1="/srv/a", name1="x", tid=7),
                 record(EV.SYSCALL, tp_id=chmod, base1="/srv/b", name1="x", tid=8),
                 # an open names the opened file's path, not a base directory
                 record(EV.SYSCALL, tp_id=NR["openat"], base1="/srv/a/f", tid=7,
                        base_dirs=0),
                 record(EV.SYSCALL, tp_id=chmod, name1="y", tid=7, n_base1=BASE_AS_BEFORE),
                 # two bases: the second (the record's last whole one) is kept, and
                 # one said "as before" means the one before this record
                 record(EV.SYSCALL, tp_id=NR["renameat2"], base1="/srv/c", name1="p",
                        name2="q", tid=8, n_base2=BASE_AS_BEFORE),
                 record(EV.SYSCALL, tp_id=chmod, name1="z", tid=8, n_base1=BASE_AS_BEFORE),
                 # an absolute name needs no base
                 record(EV.SYSCALL, tp_id=chmod, name1="/etc/x", tid=9,
                        n_base1=BASE_AS_BEFORE),
                 decoder=dec)
    assert [(e.path, e.path2, e.cut) for e in got] == [
        ("/srv/a/x", None, None), ("/srv/b/x", None, None), ("/srv/a/f", None, None),
        ("/srv/a/y", None, None),
        ("/srv/c/p", "/srv/b/q", None), ("/srv/c/z", None, None), ("/etc/x", None, None)]


def test_a_base_that_did_not_come_is_marked_never_guessed():
    dec = Decoder()
    chmod = NR["chmod"]
    got = decode(record(EV.SYSCALL, tp_id=chmod, base1="/srv/a", name1="x", tid=7),
                 b"\x01" * 10,                 # a record that cannot be read
                 record(EV.SYSCALL, tp_id=chmod, name1="y", tid=7, n_base1=BASE_AS_BEFORE),
                 record(EV.SYSCALL, tp_id=chmod, name1="y", tid=5, n_base1=BASE_AS_BEFORE),
                 decoder=dec)
    assert dec.undecodable == 1
    assert [(e.path, e.cut) for e in got] == [("/srv/a/x", None), (".../y", ["path"]),
                                              (".../y", ["path"])]


def test_a_cut_record_neither_keeps_its_base_nor_loses_the_one_before():
    dec = Decoder()
    chmod = NR["chmod"]
    got = decode(record(EV.SYSCALL, tp_id=chmod, base1="/srv/a", name1="x", tid=7),
                 record(EV.SYSCALL, tp_id=chmod, base1="/srv/b", name1="x", tid=7, cut=1),
                 record(EV.SYSCALL, tp_id=chmod, name1="y", tid=7, n_base1=BASE_AS_BEFORE,
                        cut=1),
                 record(EV.SYSCALL, tp_id=chmod, name1="z", tid=7, n_base1=BASE_AS_BEFORE),
                 decoder=dec)
    assert [e.path for e in got] == ["/srv/a/x", "/srv/b/x", "/srv/a/y", "/srv/a/z"]


def test_records_of_unfollowed_syscalls_are_dropped():
    assert decode(record(EV.SYSCALL, tp_id=999, base1="/tmp", name1="a")) == []


# ---- the table against the compiled program -----------------------------------------------
def ctypes_layout(struct_type) -> dict[str, tuple[int, int]]:
    return {name: (getattr(struct_type, name).offset, getattr(struct_type, name).size)
            for name, *_ in struct_type._fields_ if not name.startswith("__pad")}


@pytest.fixture(scope="module")
def compiled():
    from fswatchaudit.backends import probe
    p = probe("ebpf")
    if not p.usable:
        pytest.skip(f"eBPF backend: {p.reason}")
    from fswatchaudit.backends.ebpf import EbpfBackend
    from fswatchaudit.rules import RuleSet
    be = EbpfBackend(RuleSet())
    be.start()
    yield be.bpf
    be.close()


def test_struct_event_as_compiled(compiled):
    leaf = compiled[b"scratch"].sLeaf            # per-CPU array of struct event
    layout = ctypes_layout(leaf)
    table = abi.offsets(abi.EVENT_FIELDS)
    assert list(layout)[:len(table)] == list(table)
    assert {k: layout[k] for k in table} == table
    assert layout["data"] == (abi.EVENT_HEADER_SIZE, abi.DATA_SIZE + abi.PATH_SLOT)
    assert ctypes.sizeof(leaf) == abi.EVENT_HEADER_SIZE + abi.DATA_SIZE + abi.PATH_SLOT


def test_struct_syscall_spec_as_compiled(compiled):
    leaf = compiled[b"syscall_spec"].Leaf
    assert ctypes_layout(leaf) == abi.offsets(abi.SPEC_FIELDS)
    assert ctypes.sizeof(leaf) == abi.SPEC.size
    # a filled slot reads back as the table packs it
    spec = abi.SyscallSpec(dfd1=0, path1=1, flags=2, kind=abi.KIND.OPEN, perm=3, moves=1,
                           fixed_flags=0o1101, pathless=1 << 63 | 5)
    value = leaf()
    spec.fill(value)
    assert bytes(value) == abi.SPEC.pack(0, 1, -1, -1, -1, 2, abi.KIND.OPEN, 3, 0, 1, 1,
                                         0o1101, 1 << 63 | 5)


def test_struct_kcond_as_compiled(compiled):
    table = compiled[b"rule_filters"].Leaf      # the conditions of path-less rules
    slot = dict(table._fields_)["slot"]         # struct slot_filter[PATHLESS_SLOTS]
    assert slot._length_ == abi.PATHLESS_SLOTS
    kcond = slot._type_._fields_[0][1]          # struct kcond[MAX_KCONDS]
    assert kcond._length_ == abi.MAX_KCONDS
    assert ctypes_layout(kcond._type_) == abi.offsets(abi.KCOND_FIELDS)
    assert ctypes.sizeof(kcond._type_) == abi.KCOND.size
    assert compiled[b"kvals"].sLeaf._fields_[0][1]._length_ == abi.KVALS > max(abi.KF)


def test_counters_map_has_a_slot_per_counter(compiled):
    counters = compiled[b"counters"]
    assert counters.max_entries == abi.NCOUNTERS == len(abi.CNT)



def test_failed_syscalls_are_prejudged_by_watched_path_hashes(tmp_path):
    """What user space puts in the kernel's maps for failed syscalls: the hashes of the
    watched paths (as the program hashes a path's prefixes: FNV-1a of the bytes; "/" is
    the empty prefix), also as a symlink in / names them, and the directories above."""
    from fswatchaudit.backends.ebpf.backend import EbpfBackend, root_symlinks
    from fswatchaudit.rules import RuleSet, watch_rule
    assert abi.path_hash(b"") == abi.FNV_OFFSET
    assert abi.path_hash(b"a") == ((abi.FNV_OFFSET ^ ord("a")) * abi.FNV_PRIME) % (1 << 64)
    w = tmp_path / "w"
    w.mkdir()
    rs = RuleSet()
    rs.add(watch_rule(str(w)))
    rs.add(watch_rule("/"))
    links = root_symlinks()
    usr_bin = next((link for link, real in links.items() if real == "/usr/bin"), None)
    if usr_bin:
        rs.add(watch_rule("/usr/bin/true"))
    hashes, ancestors = EbpfBackend(rs)._name_entries()
    want = {abi.path_hash(os.fsencode(str(w))), abi.path_hash(b"")}
    if usr_bin:
        want |= {abi.path_hash(b"/usr/bin/true"), abi.path_hash(os.fsencode(usr_bin) + b"/true")}
    assert hashes == want
    for d in (tmp_path, tmp_path.parent, "/"):
        st = os.stat(d)
        assert (abi.kernel_dev(st.st_dev), st.st_ino) in ancestors
    st = os.stat(w)
    assert (abi.kernel_dev(st.st_dev), st.st_ino) not in ancestors


# ---- kernel memory read by plain loads ----------------------------------------------------
BPF_CALL, HELPER_PROBE_READ_KERNEL, PSEUDO_KFUNC_CALL = 0x85, 113, 2


def calls(code: bytes) -> list[tuple[int, int]]:
    """(src_reg, imm) of every call instruction (the second half of a 64-bit load is
    skipped)."""
    out, i = [], 0
    while i < len(code) // 8:
        op, regs = code[8 * i], code[8 * i + 1]
        if op == 0x18:
            i += 2
            continue
        if op == BPF_CALL:
            out.append((regs >> 4, int.from_bytes(code[8 * i + 4:8 * i + 8], "little",
                                                  signed=True)))
        i += 1
    return out


def test_kfunc_calls_are_marked_and_nothing_else():
    from fswatchaudit.backends.ebpf.build import kfunc_ids, mark_kfunc_calls

    def insn(op, regs=0, imm=0):
        return bytes([op, regs]) + b"\0\0" + imm.to_bytes(4, "little", signed=True)
    ids = kfunc_ids(["-DOFF_X=8", "-DKFUNC_RDONLY_CAST=65330", "-DBTF_OPEN_WORDS=13074"])
    assert ids == {65330}
    # a helper call (14) stays; the second half of a 64-bit load that reads like a
    # call of the kfunc is no instruction and is left alone
    code = (insn(BPF_CALL, imm=65330) + insn(BPF_CALL, imm=14)
            + insn(0x18, 0x01, 7) + insn(BPF_CALL, imm=65330))
    marked = mark_kfunc_calls(code, ids)
    assert calls(marked) == [(PSEUDO_KFUNC_CALL, 65330), (0, 14)]
    assert marked[24:] == code[24:]


def test_btf_finds_the_kfunc_and_the_open_ended_view():
    from fswatchaudit.backends.ebpf.btf import BTF
    btf = BTF()
    assert btf.func_id("bpf_rdonly_cast")
    assert btf.func_id("no_such_function_here") is None
    assert btf.open_words_id("bpf_raw_tracepoint_args")
    assert btf.open_words_id("inode") is None           # members of their own
    assert btf.open_words_id("no_such_struct") is None


def test_hot_programs_read_kernel_memory_by_plain_loads(compiled):
    """The programs that run for every syscall and every inode change read kernel
    memory through bpf_rdonly_cast views (a load each), never through
    bpf_probe_read_kernel (a helper call each); the kernel verified and runs them."""
    from fswatchaudit.backends.ebpf import loader, objcache
    from fswatchaudit.backends.ebpf.btf import BTF
    tfs, _ = loader.ensure_tracefs()
    assert tfs
    _names, have_compat = loader.syscall_slots(loader.syscall_specs(tfs))
    obj, _cached = objcache.compiled_object(loader.program_text(),
                                            loader.cflags(64, have_compat))
    cast = BTF().func_id("bpf_rdonly_cast")
    progs = {p["name"]: base64.b64decode(p["insns"]) for p in obj["progs"]}
    hot = [n for n in progs if n.endswith(("sys_exit", "ctime_ns_xchg"))
           or n.startswith("exit_")]
    assert len(hot) >= 6
    assert not any(n.endswith("sys_enter") for n in progs)     # no program at entry
    for name in hot:
        made = calls(progs[name])
        assert (0, HELPER_PROBE_READ_KERNEL) not in made, name
        if not name.startswith("exit_scan"):    # which reads only the user's names
            assert (PSEUDO_KFUNC_CALL, cast) in made, name
