"""Tamper-evident msgpack logs: a hash chain over every record, and forward-secure
seals.

Chain.  Every record the log writer stores carries, as the last key of its map,
``h``: BLAKE2b-256 over the previous record's ``h`` and the record's own bytes (the map
without its ``h``).  The chain runs across rotated files and restarts: a file's
header carries ``prev``, the ``h`` of the record before it (the last record of the
previous file, or of the same file before a restart), and a chain begun afresh hashes
over 32 zero bytes.  Putting ``h`` in each record, rather than in periodic checkpoint
records, costs one hash of a few hundred bytes and 36 bytes per record, lets the
verifier name the exact record where the chain breaks, and needs no state beyond the
last ``h``.  The hashing is done by the log's writer thread when it writes a batch,
never on the event path.

Seals.  With a sealing key, every ``seal_interval`` seconds (when records were
written since the last seal), at every rotation and at close, a record
``{"t": "seal", "time", "epoch", "kid", "final", "reason", "mac"}`` is written:
``mac`` is keyed BLAKE2b-256 with the key of epoch ``epoch`` over the chain head before
the seal, the epoch, the time and ``final``.  Then the key evolves:
K(n+1) = BLAKE2b(K(n)) and K(n) is overwritten, in memory and in the key file, so a
root attacker who takes the key today holds K(n) only and cannot make a seal for an
earlier epoch (as systemd's Forward Secure Sealing).  Seals of one run have
consecutive epochs; ``final`` seals (rotation, close) end each file, so a file that
does not end with one was truncated (or is still being written, or its writer
crashed).  Without a key, the writer still ends each file with a seal that has no
``mac``.

Keys.  ``fswatchaudit log keygen`` draws K(0) from the kernel's random generator
(``os.urandom``), writes the sealing key file (epoch 0, mode 0600, root only) and gives
the verification key (K(0) and its id) once, to be kept off the host; the verifier
computes K(n) from K(0).  Both are one line of text (``KeyState``).

What each check catches: without a key, the chain finds an edited, deleted, inserted
or reordered record, a truncated file (no closing seal) and a file replaced or
removed between two given files; it does not catch a consistent rewrite from some
point on.  With the key, seals also catch that rewrite, up to the last seal made
before the attacker took the key.
"""
from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

HASH_SIZE = 32
ZERO = bytes(HASH_SIZE)
_H_TAIL = b"\xa1h\xc4" + bytes([HASH_SIZE])     # "h": bin 8 of 32 bytes
_PREV_KEY = b"\xa4prev\xc4" + bytes([HASH_SIZE])
_HDR_PREFIX = b"\xa1t\xa3hdr"
SEAL_KEY_MAGIC = "fswatchaudit-seal-key"
VERIFY_KEY_MAGIC = "fswatchaudit-verify-key"
DEFAULT_KEY_FILE = "/var/lib/fswatchaudit/seal.key"


# -- msgpack map headers ----------------------------------------------------------

def map_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x80 | n])
    if n < 1 << 16:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


def split_map_header(raw: bytes) -> tuple[int, int]:
    """(entries, header length) of a packed map."""
    b = raw[0]
    if 0x80 <= b <= 0x8f:
        return b & 0x0f, 1
    if b == 0xde:
        return int.from_bytes(raw[1:3], "big"), 3
    if b == 0xdf:
        return int.from_bytes(raw[1:5], "big"), 5
    raise ValueError("not a map")


def _add_entry(body: bytes, entry: bytes) -> bytes:
    """A packed map with one more (packed key and value) entry at its end."""
    b0 = body[0]
    if 0x80 <= b0 < 0x8f:                           # fixmap with room: the usual case
        return bytes((b0 + 1,)) + body[1:] + entry
    if b0 == 0xde and body[2] != 0xff:              # map 16 (an event): bump the count
        return b"\xde" + bytes((body[1], body[2] + 1)) + body[3:] + entry
    n, hl = split_map_header(body)
    return map_header(n + 1) + body[hl:] + entry


def chain_hash(prev: bytes, body: bytes) -> bytes:
    return hashlib.blake2b(prev + body, digest_size=HASH_SIZE, person=b"fsa-chain").digest()


# -- keys -------------------------------------------------------------------------

def evolve(key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=HASH_SIZE, person=b"fsa-evolve").digest()


def key_id(k0: bytes) -> str:
    return hashlib.blake2b(k0, digest_size=8, person=b"fsa-keyid").hexdigest()


def seal_mac(key: bytes, epoch: int, head: bytes, when: int, final: bool) -> bytes:
    h = hashlib.blake2b(key=key, digest_size=HASH_SIZE, person=b"fsa-seal")
    h.update(epoch.to_bytes(8, "big") + head + when.to_bytes(8, "big")
             + (b"\x01" if final else b"\x00"))
    return h.digest()


class KeyError_(ValueError):
    """A key file that cannot be used."""


@dataclass
class KeyState:
    """A key at an epoch: the sealing key file (``SEAL_KEY_MAGIC v1 epoch=N kid=ID
    key=HEX``, rewritten in place at each evolution) or the verification key
    (``VERIFY_KEY_MAGIC v1 kid=ID key=HEX``, epoch 0)."""
    epoch: int
    kid: str
    key: bytearray
    sealing: bool = False

    def line(self) -> str:
        if self.sealing:
            return (f"{SEAL_KEY_MAGIC} v1 epoch={self.epoch:020d} kid={self.kid} "
                    f"key={self.key.hex()}\n")
        return f"{VERIFY_KEY_MAGIC} v1 kid={self.kid} key={self.key.hex()}\n"

    @classmethod
    def parse(cls, text: str, where: str = "key") -> KeyState:
        parts = text.split()
        if len(parts) < 4 or parts[0] not in (SEAL_KEY_MAGIC, VERIFY_KEY_MAGIC) \
                or parts[1] != "v1":
            raise KeyError_(f"{where}: not a fswatchaudit key")
        fields = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
        try:
            key = bytearray.fromhex(fields["key"])
            epoch = int(fields.get("epoch", "0"))
            kid = fields["kid"]
        except (KeyError, ValueError):
            raise KeyError_(f"{where}: damaged key file") from None
        if len(key) != HASH_SIZE:
            raise KeyError_(f"{where}: damaged key file")
        return cls(epoch, kid, key, parts[0] == SEAL_KEY_MAGIC)

    def at(self, epoch: int) -> bytes:
        """The key of a later epoch (verification)."""
        if epoch < self.epoch:
            raise KeyError_(f"the key is at epoch {self.epoch}: it cannot check epoch {epoch}")
        key = bytes(self.key)
        for _ in range(epoch - self.epoch):
            key = evolve(key)
        return key


def _check_private(fd: int, path: str) -> None:
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "not a regular file"
    elif st.st_uid != os.geteuid():
        problem = f"owned by uid {st.st_uid}"
    elif st.st_mode & 0o077:
        problem = f"others may read or write it (mode {stat.S_IMODE(st.st_mode):04o})"
    if problem:
        os.close(fd)
        raise KeyError_(f"refusing key file {path}: {problem}")


def _create_private(path: str, text: str, force: bool = False) -> None:
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        os.makedirs(d, 0o700)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_TRUNC if force else os.O_EXCL
    fd = os.open(path, flags, 0o600)
    _check_private(fd, path)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def keygen(key_file: str, verify_file: str | None = None, force: bool = False) -> str:
    """A new K(0): the sealing key file (epoch 0) and, in ``verify_file`` when given,
    the verification key; returns the verification key's line."""
    k0 = bytearray(os.urandom(HASH_SIZE))
    kid = key_id(bytes(k0))
    verify = KeyState(0, kid, bytearray(k0)).line()
    if verify_file is not None:
        _create_private(verify_file, verify, force)
    _create_private(key_file, KeyState(0, kid, k0, sealing=True).line(), force)
    return verify


def read_key(path: str) -> KeyState:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        text = os.read(fd, 4096).decode("ascii", "replace")
    finally:
        os.close(fd)
    return KeyState.parse(text, path)


class SealingKey:
    """The writer's key: opened once (0600, owned by this user, no symlink), evolved
    in place, the previous key overwritten in memory and on disk.  (Python cannot
    promise that no copy of an old key is left in freed memory; the file is
    rewritten in place and fsynced.)"""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        _check_private(self._fd, path)
        self.state = KeyState.parse(os.pread(self._fd, 4096, 0).decode("ascii", "replace"),
                                    path)
        if not self.state.sealing:
            os.close(self._fd)
            raise KeyError_(f"{path}: a verification key, not a sealing key")

    def mac(self, head: bytes, when: int, final: bool) -> bytes:
        return seal_mac(bytes(self.state.key), self.state.epoch, head, when, final)

    def evolve(self) -> None:
        new = evolve(bytes(self.state.key))
        self.state.key[:] = new
        self.state.epoch += 1
        os.pwrite(self._fd, self.state.line().encode(), 0)
        os.fsync(self._fd)

    def close(self) -> None:
        self.state.key[:] = bytes(HASH_SIZE)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# -- the writer side --------------------------------------------------------------

class Chain:
    """What the log writer (``RotatingFileSink(integrity=...)``) calls: ``attach``
    once before its first file, ``link`` on every list of records it writes and then
    ``commit`` once they are written, ``seal`` for a seal record (``seal_due`` says when an
    interval seal is due)."""

    def __init__(self, key_file: str | None = None, seal_interval: float = 60.0) -> None:
        self.key = SealingKey(key_file) if key_file else None
        self.seal_interval = seal_interval
        self.head: bytes | None = None
        # the part of the log begun by the latest header: its header's hash and how
        # many records it holds (header included), for the heads sent out (head_info)
        self.part: bytes | None = None
        self.part_records = 0
        self._provisional: tuple[bytes | None, int, bool, bytes | None, int] | None = None
        self._seal_pending = False
        self._last_seal = time.monotonic()
        self.unsealed = 0           # records since the last seal
        self.seals = 0

    def attach(self, dir_fd: int, filename: str) -> None:
        """Continue the chain of an existing log file (a restart)."""
        if self.head is not None:
            return
        try:
            fd = os.open(filename, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        except OSError:
            return
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        try:
            with os.fdopen(fd, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    unpacker.feed(chunk)
                    for obj in unpacker:
                        if isinstance(obj, dict) and isinstance(obj.get("h"), bytes):
                            self.head = obj["h"]
        except Exception:
            pass        # a damaged tail: the verifier will say so; the chain goes on

    def link(self, records: Iterable[bytes]) -> list[bytes]:
        """Each record with its ``h`` (a header also with ``prev``); provisional
        until ``commit``."""
        head, part, part_records = self.head, self.part, self.part_records
        out = []
        for body in records:
            _, hl = split_map_header(body)
            is_header = body[hl:hl + len(_HDR_PREFIX)] == _HDR_PREFIX
            if is_header and head is not None:
                body = _add_entry(body, _PREV_KEY + head)
            h = chain_hash(ZERO if head is None else head, body)
            out.append(_add_entry(body, _H_TAIL + h))
            head = h
            if is_header:
                part, part_records = h, 0
            part_records += 1
        # a write that fails is never committed: the next link starts again from the
        # committed head (and a seal not written is made again later)
        self._provisional = (head, len(out), self._seal_pending, part, part_records)
        self._seal_pending = False
        return out

    def commit(self) -> None:
        if self._provisional is None:
            return
        head, n, sealed, self.part, self.part_records = self._provisional
        self._provisional = None
        self.head = head
        self.unsealed += n
        if sealed:
            self.unsealed = 0
            self.seals += 1
            self._last_seal = time.monotonic()
            if self.key is not None:
                self.key.evolve()

    def head_info(self) -> dict[str, Any] | None:
        """The latest written head, as the remote sinks get it: ``part`` (the hash of
        the header that began this part of the log, hex), ``seq`` (its records so far,
        the header being 1) and ``h`` (the chain head, hex); None before the first
        header of this run is written."""
        if self.part is None or self.head is None:
            return None
        return {"part": self.part.hex(), "seq": self.part_records, "h": self.head.hex()}

    def seal_due(self) -> bool:
        return (self.key is not None and self.unsealed > 0
                and time.monotonic() - self._last_seal >= self.seal_interval)

    def seal(self, final: bool, reason: str) -> bytes:
        """A seal record over the chain head (to be written, alone, next)."""
        when = time.time_ns()
        data: dict[str, Any] = {"t": "seal", "time": when, "final": final, "reason": reason}
        if self.key is not None:
            data.update(epoch=self.key.state.epoch, kid=self.key.state.kid,
                        mac=self.key.mac(self.head or ZERO, when, final))
        self._seal_pending = True
        return msgpack.packb(data, use_bin_type=True)

    def stats(self) -> dict[str, Any]:
        return {"seals": self.seals,
                "seal_epoch": None if self.key is None else self.key.state.epoch}

    def close(self) -> None:
        if self.key is not None:
            self.key.close()


# -- verification -----------------------------------------------------------------

@dataclass
class Verdict:
    ok: bool = True
    problem: str | None = None          # "FILE: byte N: what"
    notes: list[str] = field(default_factory=list)
    records: int = 0
    seals: int = 0
    keyed_seals: int = 0


class _Bad(Exception):
    pass


def _records(path: str) -> tuple[bytes, list[tuple[int, int, Any]], int | None]:
    """(data, [(start, end, map)], offset of damage or None)."""
    with open(path, "rb") as fh:
        data = fh.read()
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False,
                                max_buffer_size=max(len(data), 1 << 20))
    unpacker.feed(data)
    out: list[tuple[int, int, Any]] = []
    start = 0
    while True:
        try:
            obj = unpacker.unpack()
        except msgpack.OutOfData:
            break
        except Exception:
            return data, out, start
        end = unpacker.tell()
        if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
            return data, out, start
        out.append((start, end, obj))
        start = end
    return data, out, (start if start != len(data) else None)


def verify(paths: list[str], key: KeyState | None = None, live: bool = False) -> Verdict:
    """Check files given oldest first; stops at the first problem."""
    v = Verdict()
    head: bytes | None = None
    expect_epoch: int | None = None
    new_run = False
    try:
        for index, path in enumerate(paths):
            data, recs, damage = _records(path)

            def bad(offset: int, what: str, path: str = path) -> _Bad:
                return _Bad(f"{path}: byte {offset}: {what}")
            last_seal: tuple[int, bool] | None = None
            unsealed_from: int | None = None
            for i, (start, end, obj) in enumerate(recs):
                raw = data[start:end]
                h = obj.get("h")
                if not (isinstance(h, bytes) and list(obj)[-1] == "h"
                        and raw.endswith(_H_TAIL + h)):
                    if head is None and index == 0 and not v.records:
                        raise bad(start, "the log is not chained (written without integrity)")
                    raise bad(start, "a record without its chain hash: inserted or edited")
                n, hl = split_map_header(raw)
                body = map_header(n - 1) + raw[hl:len(raw) - len(_H_TAIL) - HASH_SIZE]
                link_prev = head
                if obj["t"] == "hdr":
                    prev = obj.get("prev")
                    if prev is None:
                        if head is not None:
                            raise bad(start, "the chain starts again here: the records "
                                             "before were deleted or replaced")
                        link_prev = ZERO
                    elif head is not None and prev != head:
                        raise bad(start, "this file does not continue the chain of the "
                                         "file before it: a file was deleted, replaced or "
                                         "reordered" if i == 0 else
                                  "the header does not continue the chain: records "
                                  "before it were deleted, inserted or reordered")
                    else:
                        link_prev = prev
                    if head is not None or prev is None:
                        new_run = True
                elif head is None:
                    raise bad(start, "the file does not begin with a log header")
                assert link_prev is not None
                if chain_hash(link_prev, body) != h:
                    # an edit and a deletion look alike from here: the record's hash
                    # does not follow from the one before it
                    raise bad(start, "the chain breaks here: this record was edited, or "
                                     "one before it deleted, inserted or reordered")
                head = h
                v.records += 1
                if unsealed_from is None:
                    unsealed_from = start
                if obj["t"] == "seal":
                    v.seals += 1
                    if key is not None:
                        mac, epoch = obj.get("mac"), obj.get("epoch")
                        if not isinstance(mac, bytes) or not isinstance(epoch, int):
                            raise bad(start, "a seal without a MAC: the log was not sealed "
                                             "with a key, or the seal was replaced")
                        if obj.get("kid") != key.kid:
                            raise bad(start, f"sealed with another key (id "
                                             f"{obj.get('kid')}, not {key.kid})")
                        if expect_epoch is not None and epoch < expect_epoch:
                            raise bad(start, f"seal of epoch {epoch} after epoch "
                                             f"{expect_epoch - 1}: seals reordered or replayed")
                        if expect_epoch is not None and epoch > expect_epoch:
                            if not new_run:
                                raise bad(start, f"seals of epochs {expect_epoch}-{epoch - 1} "
                                                 "are missing: records and seals deleted")
                            v.notes.append(f"{path}: byte {start}: a restart went from seal "
                                           f"epoch {expect_epoch - 1} to {epoch}")
                        try:
                            k = key.at(epoch)
                        except KeyError_ as exc:
                            raise bad(start, str(exc)) from None
                        prev_head = link_prev
                        if seal_mac(k, epoch, prev_head, int(obj.get("time", 0)),
                                    bool(obj.get("final"))) != mac:
                            raise bad(start, "the seal does not authenticate the chain: "
                                             "the records before it were rewritten, or "
                                             "the seal was forged")
                        v.keyed_seals += 1
                        expect_epoch = epoch + 1
                        new_run = False
                    last_seal = (end, bool(obj.get("final")))
                    unsealed_from = None
            if damage is not None:
                raise bad(damage, "truncated or damaged here (not a whole record)")
            if not recs:
                raise bad(0, "empty file: truncated")
            if last_seal is None or not last_seal[1] or unsealed_from is not None:
                where = unsealed_from if unsealed_from is not None else len(data)
                if live and index == len(paths) - 1:
                    v.notes.append(f"{path}: the records from byte {where} on are not "
                                   "sealed yet (a log being written)")
                else:
                    raise bad(where, "the file does not end with its closing seal: "
                                     "truncated (or still being written, or its writer "
                                     "crashed)")
    except _Bad as exc:
        v.ok = False
        v.problem = str(exc)
    except OSError as exc:
        v.ok = False
        v.problem = f"{exc.filename}: cannot read: {exc.strerror}"
    return v


# -- the heads the remote sinks received ---------------------------------------------

@dataclass
class _Part:
    """A part of the local log: the records from one header on (see Chain.head_info)."""
    path: str
    host: Any
    hashes: list[bytes] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)


def _log_parts(paths: list[str]) -> dict[str, _Part]:
    parts: dict[str, _Part] = {}
    for path in paths:
        data, recs, _ = _records(path)
        current: _Part | None = None
        for start, _end, obj in recs:
            h = obj.get("h")
            if not isinstance(h, bytes):
                continue
            if obj["t"] == "hdr":
                current = parts[h.hex()] = _Part(path, obj.get("host"))
            if current is not None:
                current.hashes.append(h)
                current.starts.append(start)
    return parts


def log_hosts(paths: list[str]) -> list[str]:
    """The hosts named by the headers of these logs."""
    return sorted({str(p.host) for p in _log_parts(paths).values()})


def check_heads(paths: list[str], heads: list[dict[str, Any]]) -> Verdict:
    """Check logs (oldest first) against the chain heads their writer sent to remote
    sinks (``head`` markers, in the order received): every part of the log a head
    names must hold at least that many records and the head's hash at that place, and
    no part the remote side heard of after these files began may be missing."""
    v = Verdict()
    try:
        parts = _log_parts(paths)
    except OSError as exc:
        return Verdict(False, f"{exc.filename}: cannot read: {exc.strerror}")
    hosts = {p.host for p in parts.values()}
    latest: dict[str, tuple[int, str]] = {}     # part -> (seq, h) of its newest head
    unknown_after: dict[str, int] = {}
    older = 0
    for head in heads:
        if head.get("host") not in hosts:
            continue
        part, seq, h = head.get("part"), head.get("seq"), head.get("h")
        if not isinstance(part, str) or not isinstance(seq, int) or not isinstance(h, str):
            continue
        v.records += 1
        if part in parts:
            if seq >= latest.get(part, (0, ""))[0]:
                latest[part] = (seq, h)
        elif latest:
            unknown_after[part] = max(seq, unknown_after.get(part, 0))
        else:
            older += 1
    problems = []
    if not v.records:
        problems.append(f"no chain heads of host {', '.join(map(str, hosts))} among the "
                        "heads given: nothing to check against")
    elif not latest:
        problems.append(f"none of the {v.records} remote heads names a part of these "
                        "files: the log was replaced (or the heads are of other files)")
    for name, (seq, h) in latest.items():
        p = parts[name]
        have = len(p.hashes)
        if have < seq:
            at = p.starts[-1] if p.starts else 0
            problems.append(f"{p.path}: log truncated after seq {have} (byte {at}): the "
                            f"remote head says {seq}")
        elif p.hashes[seq - 1].hex() != h:
            problems.append(f"{p.path}: byte {p.starts[seq - 1]}: record seq {seq} is not "
                            "the one the remote head names: the log was rewritten there")
    for name, seq in unknown_after.items():
        problems.append(f"the remote heads name a part of the log (header {name[:16]}, "
                        f"{seq} records) written after these files began that none of "
                        "them holds: deleted or replaced")
    if older:
        v.notes.append(f"{older} remote heads are of files older than those given "
                       "(not checked)")
    if problems:
        v.ok = False
        v.problem = "; ".join(problems)
    return v


__all__ = ["DEFAULT_KEY_FILE", "Chain", "KeyState", "SealingKey", "Verdict", "keygen",
           "check_heads", "log_hosts", "read_key", "verify"]
