"""The compiled programs, cached, and loaded without bcc.

bcc 0.26 cannot load a precompiled ELF object, and compiling probes.c with clang costs
1.5-2 s and leaves LLVM (about 60 MB) in the process.  So the programs are compiled in a
short-lived child process (build.py), and its output (each program's final instructions,
where they name maps, the map definitions) is kept in a cache file.  On every start the
auditor creates the maps and loads the programs from that object with plain bpf(2) calls
(bpfsys.py); the kernel's verifier still checks every program at every load.

The cache is keyed by the sha256 of everything the object depends on: the program text
(probes.c with the generated ABI header), the compiler flags (the kernel's struct
offsets among them), bcc's version, the kernel release and build, and the kernel's BTF.
A change to any of them misses the cache once.  The file is root's own, 0600, in a 0700
directory, opened without following symlinks, and its sha256 is checked before use.
"""
from __future__ import annotations

import base64
import ctypes
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ...diag import get_logger
from ...privdir import open_private_dir
from ...sinks.rotating import unsafe_log_file
from . import bpfsys
from .btf import VMLINUX_BTF

log = get_logger("ebpf")

# FSWATCHAUDIT_CACHE_DIR: another directory (benchmarks measure a cold start with it)
CACHE_DIR = os.environ.get("FSWATCHAUDIT_CACHE_DIR") or "/var/cache/fswatchaudit"
FORMAT = 1
SUFFIX = ".bpfobj"
KEEP = 4            # entries kept (other ring sizes, the previous sources)
BUILD_TIMEOUT = 300.0
# attach order: by (kind, target), else by kind
ATTACH_ORDER: dict[Any, int] = {"tail": 0, ("raw", "sys_exit"): 1}


class ObjectError(Exception):
    """The programs could not be compiled or loaded (the message says why)."""


# ---- the key ----------------------------------------------------------------------------
def bcc_version() -> str:
    """bcc's version, read from its package without importing it (importing bcc maps
    libbcc and LLVM into the process)."""
    spec = importlib.util.find_spec("bcc")
    if spec is None or not spec.submodule_search_locations:
        return "none"
    for loc in spec.submodule_search_locations:
        try:
            with open(os.path.join(loc, "version.py")) as fh:
                return fh.read().strip()
        except OSError:
            pass
    return "unknown"


_digests: dict[str, str] = {}


def file_digest(path: str) -> str:
    """sha256 of a file (hex), once per process: the kernel's BTF does not change
    while it runs."""
    if path not in _digests:
        _digests[path] = _file_digest(path)
    return _digests[path]


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    except OSError:
        return "none"
    return h.hexdigest()


def digest_of(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def kernel_identity() -> list[bytes]:
    """The running kernel: release, build, machine and the digest of its BTF."""
    uts = os.uname()
    return [uts.release.encode(), uts.version.encode(), uts.machine.encode(),
            file_digest(VMLINUX_BTF).encode()]


def cache_key(text: bytes, cflags: list[str]) -> str:
    return digest_of(str(FORMAT).encode(), text, "\0".join(cflags).encode(),
                     bcc_version().encode(), *kernel_identity())


# ---- the cache file ---------------------------------------------------------------------
def read_cached(cache_dir: str, key: str, suffix: str = SUFFIX) -> dict[str, Any] | None:
    """The cached entry for ``key``, or None (missing, not ours, or damaged)."""
    name = key + suffix
    try:
        dfd = open_private_dir(cache_dir)
    except OSError as exc:
        log.warning("compiled-program cache not usable", dir=cache_dir, error=str(exc))
        return None
    try:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as fh:
            problem = unsafe_log_file(os.fstat(fh.fileno()))
            data = fh.read() if problem is None else b""
    except OSError as exc:
        problem = str(exc)
    finally:
        os.close(dfd)
    if problem is None:
        digest, _, body = data.partition(b"\n")
        if hashlib.sha256(body).hexdigest().encode() != digest:
            problem = "its sha256 does not match its contents"
        else:
            try:
                obj = json.loads(body)
            except ValueError:
                problem = "not a compiled object"
            else:
                if obj.get("key") == key and obj.get("format") == FORMAT:
                    return obj
                problem = "made for other sources"
    log.warning("compiled-program cache entry ignored", file=os.path.join(cache_dir, name),
                reason=problem)
    return None


def write_cached(cache_dir: str, key: str, obj: dict[str, Any], suffix: str = SUFFIX) -> None:
    """Store an entry (0600, never through a symlink); keep the newest KEEP of a kind."""
    body = json.dumps(dict(obj, key=key, format=FORMAT)).encode()
    data = hashlib.sha256(body).hexdigest().encode() + b"\n" + body
    name = key + suffix
    tmp = f".{name}.{os.getpid()}"
    try:
        dfd = open_private_dir(cache_dir)
    except OSError as exc:
        log.warning("compiled programs not cached", dir=cache_dir, error=str(exc))
        return
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dfd)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        entries = sorted((os.stat(n, dir_fd=dfd, follow_symlinks=False).st_mtime_ns, n)
                         for n in os.listdir(dfd) if n.endswith(suffix) and n != name)
        for _, old in entries[:max(0, len(entries) - (KEEP - 1))]:
            os.unlink(old, dir_fd=dfd)
    except OSError as exc:
        log.warning("compiled programs not cached", dir=cache_dir, error=str(exc))
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
    finally:
        os.close(dfd)


# ---- compiling (in a child process) -------------------------------------------------------
def compile_in_child(text: bytes, cflags: list[str]) -> dict[str, Any]:
    build = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build.py")
    request = json.dumps({"text": base64.b64encode(text).decode(), "cflags": cflags})
    try:
        proc = subprocess.run([sys.executable, build], input=request.encode(),
                              capture_output=True, timeout=BUILD_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ObjectError(f"compiling the BPF programs failed: {exc}") from None
    if proc.returncode != 0:
        why = proc.stderr.decode(errors="replace").strip()
        raise ObjectError(f"the BPF programs did not compile: {why[-4000:]}")
    try:
        obj: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        raise ObjectError("the BPF compiler's output is not a compiled object") from None
    return obj


def compiled_object(text: bytes, cflags: list[str],
                    cache_dir: str | None = CACHE_DIR) -> tuple[dict[str, Any], bool]:
    """(the compiled object, whether it came from the cache); cache_dir None: no cache."""
    key = cache_key(text, cflags)
    if cache_dir is not None:
        obj = read_cached(cache_dir, key)
        if obj is not None:
            return obj, True
    obj = compile_in_child(text, cflags)
    if cache_dir is not None:
        write_cached(cache_dir, key, obj)
    return obj, False


# ---- bcc's type descriptions -> ctypes ---------------------------------------------------
SCALARS: dict[str, Any] = {
    "char": ctypes.c_char, "signed char": ctypes.c_byte, "unsigned char": ctypes.c_ubyte,
    "short": ctypes.c_short, "unsigned short": ctypes.c_ushort, "int": ctypes.c_int,
    "unsigned int": ctypes.c_uint, "long": ctypes.c_long, "unsigned long": ctypes.c_ulong,
    "long long": ctypes.c_longlong, "unsigned long long": ctypes.c_ulonglong,
    "_Bool": ctypes.c_bool,
}


def ctype_of(desc: Any) -> Any:
    """The ctypes type for a bcc table type description (JSON from libbcc):
    a scalar name, or [name, [[member, type, (dims)], ...], "struct"|"struct_packed"|"union"]."""
    if isinstance(desc, str):
        if desc not in SCALARS:
            raise ObjectError(f"map type {desc!r} is not known")
        return SCALARS[desc]
    name, members, kind = desc[0], desc[1], desc[2] if len(desc) > 2 else "struct"
    fields: list[tuple] = []
    for member in members:
        t = ctype_of(member[1])
        if len(member) > 2 and isinstance(member[2], list):
            for dim in reversed(member[2]):
                t = t * dim
            fields.append((member[0], t))
        elif len(member) > 2:                    # a bit field
            fields.append((member[0], t, member[2]))
        else:
            fields.append((member[0], t))
    base = ctypes.Union if kind == "union" else ctypes.Structure
    attrs: dict[str, Any] = {"_fields_": fields}
    if kind.endswith("_packed"):
        attrs["_pack_"] = 1
    return type(name or "anon", (base,), attrs)


# ---- loading ----------------------------------------------------------------------------
class Programs:
    """The maps and programs of one compiled object; ``[name]`` is a map (bpfsys.Map).

    Creating it creates the maps and starts loading the programs in threads (the
    kernel's verifier works on all CPUs meanwhile, outside the GIL), so the maps can
    be filled while it runs; ``attach()`` waits for the programs and attaches them.
    ``cleanup()`` detaches and closes everything."""

    def __init__(self, obj: dict[str, Any], tracefs: str) -> None:
        self.maps: dict[bytes, bpfsys.Map] = {}
        self.tracefs = tracefs
        self.cached = False                # the object came from the cache
        self.attached = False
        self._map_fds: list[int] = []
        self._prog_fds: list[int] = []
        self._attach_fds: list[int] = []
        self._jobs: list[tuple[tuple[int, bytes], list[dict[str, Any]]]] = []
        self._loading: list[Future] = []
        try:
            self._start(obj)
        except BaseException:
            self.cleanup()
            raise

    def _start(self, obj: dict[str, Any]) -> None:
        for m in obj["maps"]:
            fd = bpfsys.map_create(m["type"], m["key_size"], m["value_size"],
                                   m["max_entries"], m["flags"], m["name"])
            self._map_fds.append(fd)
            self.maps[m["name"].encode()] = bpfsys.Map(
                m["name"], fd, m["type"], m["max_entries"], ctype_of(m["key_desc"]),
                ctype_of(m["leaf_desc"]))
        # the same instructions for several tracepoints: loaded once, attached to each
        unique: dict[tuple[int, bytes], list[dict[str, Any]]] = {}
        for p in obj["progs"]:
            code = bytearray(base64.b64decode(p["insns"]))
            for index, map_name in p["relocs"]:
                fd = self.maps[map_name.encode()].map_fd
                code[8 * index + 4:8 * index + 8] = fd.to_bytes(4, "little", signed=True)
            ptype = (bpfsys.PROG_TYPE_RAW_TRACEPOINT if p["attach"] in ("raw", "tail")
                     else bpfsys.PROG_TYPE_TRACEPOINT)
            unique.setdefault((ptype, bytes(code)), []).append(p)
        license_ = obj["license"].encode()
        self._jobs = sorted(unique.items(), key=lambda kv: -len(kv[0][1]))

        def load(job: tuple[tuple[int, bytes], list[dict[str, Any]]]) -> int:
            (ptype, code), users = job
            return bpfsys.prog_load(ptype, code, license_, "fswa_" + users[0]["target"])
        # the verifier runs in the loading thread: programs load on all CPUs at once
        workers = max(1, min(len(self._jobs), os.cpu_count() or 1))
        ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fswatchaudit-bpf")
        self._loading = [ex.submit(load, job) for job in self._jobs]
        ex.shutdown(wait=False)

    def _loaded(self) -> list[int]:
        """Wait for every load; the fds of those that loaded (kept for cleanup), and
        the first error raised once all are done."""
        error: BaseException | None = None
        for fut in self._loading:
            try:
                self._prog_fds.append(fut.result())
            except BaseException as exc:        # close what did load, then report
                error = error or exc
        self._loading = []
        if error is not None:
            raise error
        return self._prog_fds

    def attach(self) -> None:
        """Wait for the programs to load, then attach each to its tracepoints."""
        if self.attached:
            return
        try:
            prog_fds = self._loaded()
            uses = [(p, prog_fd) for ((_ptype, _code), users), prog_fd
                    in zip(self._jobs, prog_fds, strict=True) for p in users]
            # tail programs into their slots first, then sys_exit before the programs
            # that start a syscall's state (on_ctime): every state started is ended
            uses.sort(key=lambda use: ATTACH_ORDER.get((use[0]["attach"], use[0]["target"]),
                                                       ATTACH_ORDER.get(use[0]["attach"], 9)))
            for p, prog_fd in uses:
                if p["attach"] == "tail":       # into its slot of a program array
                    table, _, slot = p["target"].partition(":")
                    prog_array = self.maps[table.encode()]
                    prog_array[int(slot)] = prog_array.Leaf(prog_fd)
                elif p["attach"] == "raw":
                    self._attach_fds.append(
                        bpfsys.attach_raw_tracepoint(prog_fd, p["target"]))
                else:
                    category, _, event = p["target"].partition(":")
                    self._attach_fds.append(bpfsys.attach_tracepoint(
                        prog_fd, self.tracefs, category, event))
        except BaseException:
            self.cleanup()
            raise
        self.attached = True

    def __getitem__(self, name: bytes) -> bpfsys.Map:
        return self.maps[name]

    def cleanup(self) -> None:
        try:
            self._loaded()              # loads still running: wait, to close them too
        except BaseException:           # noqa: BLE001 - closing anyway
            pass
        fds = self._attach_fds + self._prog_fds + self._map_fds
        self._attach_fds, self._prog_fds, self._map_fds = [], [], []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.maps = {}
        self.attached = False
