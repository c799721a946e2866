"""The kernel binding for loaded programs: bpf(2) and perf_event_open(2) through ctypes.

The long-running process loads the programs from their compiled instructions with these
calls alone, so it never maps bcc's libbcc (and the LLVM linked into it: about 60 MB of
memory) into itself.  Maps are read and written through ``Map``, which offers the part
of bcc's table interface the backend uses (``Key``, ``Leaf``, ``sLeaf``, item access).
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from typing import Any

from ... import syscalls

# bpf(2) commands (include/uapi/linux/bpf.h)
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
PROG_LOAD = 5
RAW_TRACEPOINT_OPEN = 17
BTF_LOAD = 18
# task storage: a value per task, found from the task itself (no hash lookup); the
# kernel wants it created without preallocation and with BTF for its key and value
MAP_TYPE_TASK_STORAGE = 29
MAP_F_NO_PREALLOC = 1
# map types whose values are per CPU
PERCPU_MAP_TYPES = {5, 6, 10}       # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
# program types
PROG_TYPE_TRACEPOINT = 5
PROG_TYPE_RAW_TRACEPOINT = 17
INSN_SIZE = 8
OBJ_NAME_LEN = 16
ATTR_SIZE = 128
# perf_event_open(2) for a tracepoint, and its ioctls
PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 8
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_SET_BPF = 0x40042408
PERF_ATTR_SIZE = 64                 # PERF_ATTR_SIZE_VER0: type, size, config, period...
LOG_SIZE = 4 << 20                  # verifier log kept when a load fails

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)


class BPFError(OSError):
    """A bpf(2) call failed; ``log`` is the verifier's log for a refused program."""

    def __init__(self, err: int, what: str, log: str = "") -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.log = log


def _nr(name: str) -> int:
    nr = syscalls.syscall_numbers().get(name)
    if nr is None:
        raise BPFError(errno.ENOSYS, f"no syscall number for {name}")
    return nr


_NR_BPF: int | None = None


def _bpf(cmd: int, attr: ctypes.Array, what: str) -> int:
    global _NR_BPF
    if _NR_BPF is None:
        _NR_BPF = _nr("bpf")
    ret = _libc.syscall(_NR_BPF, cmd, ctypes.byref(attr), ATTR_SIZE)
    if ret < 0:
        raise BPFError(ctypes.get_errno(), what)
    return int(ret)


def _attr() -> ctypes.Array:
    return (ctypes.c_ubyte * ATTR_SIZE)()


def _put(attr: ctypes.Array, offset: int, ctype: Any, value: int) -> None:
    ctype.from_buffer(attr, offset).value = value


def _put_name(attr: ctypes.Array, offset: int, name: str) -> None:
    raw = "".join(c if c.isalnum() or c in "_." else "_" for c in name)
    raw_b = raw.encode()[:OBJ_NAME_LEN - 1]
    ctypes.memmove(ctypes.addressof(attr) + offset, raw_b, len(raw_b))


def possible_cpus() -> int:
    """Number of possible CPUs (the stride of per-CPU map values)."""
    with open("/sys/devices/system/cpu/possible") as fh:
        text = fh.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


# ---- maps -------------------------------------------------------------------------------
# BTF kinds and the records of a minimal type description (the kernel's btf.h)
BTF_MAGIC, BTF_KIND_INT, BTF_KIND_ARRAY = 0xEB9F, 1, 3
BTF_INT_SIGNED = 1


def storage_btf(value_size: int) -> tuple[int, int, int]:
    """BTF describing a local storage map: key ``int`` (type 1), value ``u8[value_size]``
    (type 3).  Returns (btf fd, key type id, value type id); the caller closes the fd."""
    strings = b"\0int\0u8\0"
    types = (struct.pack("<IIII", 1, BTF_KIND_INT << 24, 4, (BTF_INT_SIGNED << 24) | 32)
             + struct.pack("<IIII", 5, BTF_KIND_INT << 24, 1, 8)
             + struct.pack("<IIIIII", 0, BTF_KIND_ARRAY << 24, 0, 2, 1, value_size))
    blob = struct.pack("<HBBIIIII", BTF_MAGIC, 1, 0, 24, 0, len(types), len(types),
                       len(strings)) + types + strings
    data = ctypes.create_string_buffer(blob, len(blob))
    attr = _attr()
    _put(attr, 0, ctypes.c_uint64, ctypes.addressof(data))
    _put(attr, 16, ctypes.c_uint32, len(blob))
    return _bpf(BTF_LOAD, attr, "loading the BTF of a task storage map"), 1, 3


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               flags: int, name: str) -> int:
    attr = _attr()
    btf_fd = -1
    if map_type == MAP_TYPE_TASK_STORAGE:
        max_entries, flags = 0, flags | MAP_F_NO_PREALLOC
        btf_fd, key_id, value_id = storage_btf(value_size)
        _put(attr, 48, ctypes.c_uint32, btf_fd)
        _put(attr, 52, ctypes.c_uint32, key_id)
        _put(attr, 56, ctypes.c_uint32, value_id)
    for i, v in enumerate((map_type, key_size, value_size, max_entries, flags)):
        _put(attr, 4 * i, ctypes.c_uint32, v)
    _put_name(attr, 28, name)
    try:
        return _bpf(MAP_CREATE, attr, f"creating map {name}")
    finally:
        if btf_fd >= 0:
            os.close(btf_fd)


def _elem(cmd: int, fd: int, key: Any, value: Any, flags: int, what: str) -> int:
    attr = _attr()
    _put(attr, 0, ctypes.c_uint32, fd)
    _put(attr, 8, ctypes.c_uint64, ctypes.addressof(key) if key is not None else 0)
    _put(attr, 16, ctypes.c_uint64, ctypes.addressof(value) if value is not None else 0)
    _put(attr, 24, ctypes.c_uint64, flags)
    return _bpf(cmd, attr, what)


class Map:
    """One BPF map, with bcc's table interface as far as the backend uses it: ``Key``
    and ``Leaf`` are ctypes types (for per-CPU maps ``sLeaf`` is one CPU's value and
    ``Leaf`` the array of them), ``map[key]`` raises KeyError where there is no entry.
    An int key is turned into ``Key(int)``."""

    def __init__(self, name: str, fd: int, map_type: int, max_entries: int,
                 key_type: Any, leaf_type: Any) -> None:
        self.name = name
        self.map_fd = fd
        self.map_type = map_type
        self.max_entries = max_entries
        self.Key = key_type
        self.percpu = map_type in PERCPU_MAP_TYPES
        if self.percpu:
            self.sLeaf = leaf_type
            self.ncpus = possible_cpus()
            stride = (ctypes.sizeof(leaf_type) + 7) & ~7
            if stride != ctypes.sizeof(leaf_type):   # values are 8-byte aligned per CPU
                leaf_type = type(f"{name}_slot", (ctypes.Structure,),
                                 {"_fields_": [("v", leaf_type)], "_align_": 8})
            self.Leaf = leaf_type * self.ncpus
        else:
            self.Leaf = leaf_type

    def _key(self, key: Any) -> Any:
        return self.Key(key) if isinstance(key, int) else key

    def __getitem__(self, key: Any) -> Any:
        value = self.Leaf()
        try:
            _elem(MAP_LOOKUP_ELEM, self.map_fd, self._key(key), value, 0,
                  f"reading map {self.name}")
        except BPFError as exc:
            if exc.errno == errno.ENOENT:
                raise KeyError(key) from None
            raise
        if self.percpu:
            return [v.value if hasattr(v, "value") else v for v in value]
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        if self.percpu and not isinstance(value, ctypes.Array):
            raise TypeError("a per-CPU map takes one value per CPU")
        _elem(MAP_UPDATE_ELEM, self.map_fd, self._key(key), value, 0,
              f"writing map {self.name}")

    def __delitem__(self, key: Any) -> None:
        try:
            _elem(MAP_DELETE_ELEM, self.map_fd, self._key(key), None, 0,
                  f"deleting from map {self.name}")
        except BPFError as exc:
            if exc.errno == errno.ENOENT:
                raise KeyError(key) from None
            raise

    def keys(self) -> Iterator[Any]:
        key, nxt = None, self.Key()
        while True:
            try:
                _elem(MAP_GET_NEXT_KEY, self.map_fd, key, nxt, 0, f"listing map {self.name}")
            except BPFError as exc:
                if exc.errno == errno.ENOENT:
                    return
                raise
            yield nxt
            key, nxt = nxt, self.Key()


# ---- programs ---------------------------------------------------------------------------
def prog_load(prog_type: int, insns: bytes, license_: bytes, name: str) -> int:
    """Load one program; on refusal the error carries the verifier's log."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license_)
    attr = _attr()
    _put(attr, 0, ctypes.c_uint32, prog_type)
    _put(attr, 4, ctypes.c_uint32, len(insns) // INSN_SIZE)
    _put(attr, 8, ctypes.c_uint64, ctypes.addressof(code))
    _put(attr, 16, ctypes.c_uint64, ctypes.addressof(lic))
    _put_name(attr, 48, name)
    try:
        return _bpf(PROG_LOAD, attr, f"loading program {name}")
    except BPFError as exc:
        if exc.errno not in (errno.EACCES, errno.EINVAL):
            raise
    log = ctypes.create_string_buffer(LOG_SIZE)        # again, for the verifier's words
    _put(attr, 24, ctypes.c_uint32, 1)
    _put(attr, 28, ctypes.c_uint32, LOG_SIZE)
    _put(attr, 32, ctypes.c_uint64, ctypes.addressof(log))
    try:
        return _bpf(PROG_LOAD, attr, f"loading program {name}")
    except BPFError as exc:
        text = log.value.decode(errors="replace")
        raise BPFError(exc.errno or errno.EINVAL, f"the kernel refused program {name}",
                       text) from None


def attach_raw_tracepoint(prog_fd: int, tracepoint: str) -> int:
    tp = ctypes.create_string_buffer(tracepoint.encode())
    attr = _attr()
    _put(attr, 0, ctypes.c_uint64, ctypes.addressof(tp))
    _put(attr, 8, ctypes.c_uint32, prog_fd)
    return _bpf(RAW_TRACEPOINT_OPEN, attr, f"attaching to raw tracepoint {tracepoint}")


def attach_tracepoint(prog_fd: int, tracefs: str, category: str, event: str) -> int:
    """A perf event on tracepoint category:event running the program (on every CPU:
    a tracepoint's programs belong to the tracepoint, not to the event's CPU)."""
    what = f"attaching to tracepoint {category}:{event}"
    with open(f"{tracefs}/events/{category}/{event}/id") as fh:
        tp_id = int(fh.read())
    attr = (ctypes.c_ubyte * PERF_ATTR_SIZE)()
    _put(attr, 0, ctypes.c_uint32, PERF_TYPE_TRACEPOINT)
    _put(attr, 4, ctypes.c_uint32, PERF_ATTR_SIZE)
    _put(attr, 8, ctypes.c_uint64, tp_id)
    _put(attr, 16, ctypes.c_uint64, 1)                 # sample_period
    _put(attr, 48, ctypes.c_uint32, 1)                 # wakeup_events
    fd = _libc.syscall(_nr("perf_event_open"), ctypes.byref(attr), -1, 0, -1,
                       PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        raise BPFError(ctypes.get_errno(), what)
    for req, arg in ((PERF_EVENT_IOC_SET_BPF, prog_fd), (PERF_EVENT_IOC_ENABLE, 0)):
        if _libc.ioctl(fd, req, arg) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise BPFError(err, what)
    return int(fd)
