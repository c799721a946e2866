"""Compiling probes.c with bcc, in a process of its own.

Run as a script, ``python .../ebpf/build.py`` (it imports nothing of the package, so
the child loads only bcc): reads ``{"text": base64,
"cflags": [...]}`` on stdin, compiles with bcc (clang and LLVM run here, never in the
auditor), and writes the compiled object on stdout as JSON: every program's final
instructions (``BPF.dump_func``) with the places where they name a map, and every map's
definition and bcc's description of its key and value types.  Nothing is loaded into
the kernel here; objcache.py does that from the object (or from its cached copy).
"""
from __future__ import annotations

import base64
import ctypes
import json
import os
import sys
from typing import Any

BPF_LD_IMM64 = 0x18
BPF_CALL = 0x85
BPF_PSEUDO_KFUNC_CALL = 2          # src_reg of a call: imm is a kernel function's BTF id
KFUNC_FLAG = "-DKFUNC_"            # -DKFUNC_NAME=ID: the kfuncs probes.c calls
PSEUDO_MAP_KINDS = (1, 2)          # BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE: imm is a map fd
RAW_TP_PREFIX = b"raw_tracepoint__"
TP_PREFIX = b"tracepoint__"
# Programs reached by a tail call, not attached: name -> (program array, slot).  They
# are raw tracepoint programs (the type of the programs that call them).
TAIL_CALLS = {b"uring_ctime": ("ctime_tail", 0), b"deep_walk": ("deep_tail", 0),
              b"deep_ctime": ("deep_tail", 1), b"deep_open": ("deep_tail", 2),
              b"deep_path": ("deep_tail", 3), b"send_event": ("send_tail", 0),
              b"exit_open": ("exit_tail", 0), b"exit_changed": ("exit_tail", 1),
              b"exit_failed": ("exit_tail", 2), b"exit_scan": ("exit_tail", 3)}


def _declare(lib: Any) -> None:
    for name, res, args in (
            ("bpf_num_tables", ctypes.c_ulonglong, [ctypes.c_void_p]),
            ("bpf_table_name", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_ulonglong]),
            ("bpf_table_fd_id", ctypes.c_int, [ctypes.c_void_p, ctypes.c_ulonglong]),
            ("bpf_table_key_size_id", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_ulonglong]),
            ("bpf_table_leaf_size_id", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_ulonglong])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def attach_point(func: bytes) -> tuple[str, str] | None:
    """A program's attach point from its bcc name, as bcc's autoload reads it:
    ("raw", tracepoint) or ("tp", "category:event"), or ("tail", "array:slot") for a
    program reached by a tail call; None: not a program to load."""
    if func in TAIL_CALLS:
        table, slot = TAIL_CALLS[func]
        return "tail", f"{table}:{slot}"
    if func.startswith(RAW_TP_PREFIX):
        return "raw", func[len(RAW_TP_PREFIX):].decode()
    if func.startswith(TP_PREFIX):
        return "tp", func[len(TP_PREFIX):].replace(b"__", b":").decode()
    return None


def map_relocations(code: bytes, fd_names: dict[int, str]) -> list[tuple[int, str]]:
    """(instruction index, map name) for every 64-bit load of a map's fd."""
    out = []
    i, n = 0, len(code) // 8
    while i < n:
        op, regs = code[8 * i], code[8 * i + 1]
        if op == BPF_LD_IMM64:
            if regs >> 4 in PSEUDO_MAP_KINDS:
                fd = int.from_bytes(code[8 * i + 4:8 * i + 8], "little", signed=True)
                if fd not in fd_names:
                    raise RuntimeError(f"instruction {i} names fd {fd}, which is no map")
                out.append((i, fd_names[fd]))
            i += 2
        else:
            i += 1
    return out


def kfunc_ids(cflags: list[str]) -> set[int]:
    """The BTF ids of the kernel functions the programs call (loader.py's flags)."""
    return {int(f.partition("=")[2]) for f in cflags if f.startswith(KFUNC_FLAG)}


def mark_kfunc_calls(code: bytes, ids: set[int]) -> bytes:
    """probes.c calls a kfunc as a helper whose number is the function's BTF id (the
    way bcc declares helpers); such calls become kfunc calls.  Helper numbers are
    below a thousand and BTF ids of functions far above, so none is taken for another."""
    out = bytearray(code)
    i, n = 0, len(code) // 8
    while i < n:
        op, regs = out[8 * i], out[8 * i + 1]
        if op == BPF_LD_IMM64:
            i += 2
            continue
        if op == BPF_CALL and regs >> 4 == 0 and \
                int.from_bytes(out[8 * i + 4:8 * i + 8], "little", signed=True) in ids:
            out[8 * i + 1] = (BPF_PSEUDO_KFUNC_CALL << 4) | (regs & 0x0F)
        i += 1
    return bytes(out)


def compile_object(text: bytes, cflags: list[str]) -> dict[str, Any]:
    from bcc import BPF, libbcc

    class Unloaded(BPF):
        def _trace_autoload(self) -> None:      # compile only: the auditor loads
            pass

    headers = f"/lib/modules/{os.uname().release}/build"
    if not os.path.isdir(headers) and "BCC_KERNEL_SOURCE" not in os.environ:
        os.environ["BCC_KERNEL_SOURCE"] = os.path.join(os.path.dirname(
            os.path.abspath(__file__)), "include")
    bpf = Unloaded(text=text, cflags=cflags)
    lib = libbcc.lib
    _declare(lib)
    mod = bpf.module
    maps, fd_names = [], {}
    for i in range(lib.bpf_num_tables(mod)):
        name = lib.bpf_table_name(mod, i)
        fd_names[lib.bpf_table_fd_id(mod, i)] = name.decode()
        maps.append({"name": name.decode(), "type": lib.bpf_table_type_id(mod, i),
                     "key_size": lib.bpf_table_key_size_id(mod, i),
                     "value_size": lib.bpf_table_leaf_size_id(mod, i),
                     "max_entries": lib.bpf_table_max_entries_id(mod, i),
                     "flags": lib.bpf_table_flags_id(mod, i),
                     "key_desc": json.loads(lib.bpf_table_key_desc(mod, name)),
                     "leaf_desc": json.loads(lib.bpf_table_leaf_desc(mod, name))})
    progs = []
    kfuncs = kfunc_ids(cflags)
    for i in range(lib.bpf_num_functions(mod)):
        func = lib.bpf_function_name(mod, i)
        point = attach_point(func)
        if point is None:
            continue
        code = mark_kfunc_calls(bpf.dump_func(func), kfuncs)
        progs.append({"name": func.decode(), "attach": point[0], "target": point[1],
                      "insns": base64.b64encode(code).decode(),
                      "relocs": map_relocations(code, fd_names)})
    return {"license": lib.bpf_module_license(mod).decode(), "maps": maps, "progs": progs}


def main() -> int:
    request = json.load(sys.stdin)
    try:
        obj = compile_object(base64.b64decode(request["text"]), request["cflags"])
    except Exception as exc:      # reported by the parent as why the backend is unusable
        print(f"{exc}", file=sys.stderr)
        return 1
    json.dump(obj, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
