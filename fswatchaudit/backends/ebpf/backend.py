"""eBPF backend: bcc programs on kernel tracepoints, filtering on inodes in the kernel.

The programs (probes.c) attach only to tracepoints: syscall enter/exit for the
filesystem syscalls, the timestamp:* inode ctime tracepoints (which inodes a syscall
changed, also for io_uring workers), sched_process_exec/fork/exit and
io_uring_complete.  A hash map of watched (device, inode) pairs with permission masks
decides in the kernel which operations reach user space; the walk up the directory tree
happens at the time of the operation, so new and moved directories are covered at once.

This module keeps the kernel's maps in step with the rules and scopes; loader.py loads
the programs, decode.py turns their records into events, abi.py is what both sides share.
The backend reports every record the kernel delivers (marking those of audited
processes with their scope keys); matching them against the rules is the consumer's job.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import stat
import time
from dataclasses import replace
from typing import cast

from ...events import Event, ProcessState
from ...rules import Rule, RuleError, RuleSet
from ...rules.fields import FIELDS, Where
from ..base import Backend, BackendUnavailable
from . import loader
from .abi import (
    AUDIT,
    CNT,
    COMPAT_BASE,
    GEN,
    KERNEL_FIELDS,
    KERNEL_OPS,
    KF,
    MAX_KCONDS,
    PATHLESS_SLOTS,
    PERM_BITS,
    REL,
    SHARED_SLOT,
    SyscallSpec,
    kernel_dev,
    path_hash,
)
from .decode import Decoder, mount_points
from .ringbuf import RingReader

DEFAULT_QUEUE_SIZE = 32 << 20   # bytes of ring buffer
READ_BATCH = 4096               # records decoded per read: the consumer's memory bound
# a watched map value: masks (self, child, subtree), rule bits (self, child, subtree, name)
WatchValue = tuple[int, int, int, int, int, int, int]


def ring_pages(queue_size: int | None) -> int:
    """Ring buffer bytes -> pages: a power of two, at least one page."""
    pages = max(1, (queue_size or DEFAULT_QUEUE_SIZE) // mmap.PAGESIZE)
    return 1 << (pages.bit_length() - 1)


def root_symlinks() -> dict[str, str]:
    """Symlinks in / -> where they lead (Debian: /bin -> /usr/bin): other names of the
    paths below them."""
    out = {}
    try:
        with os.scandir("/") as it:
            for entry in it:
                if entry.is_symlink():
                    real = os.path.realpath(entry.path)
                    if real != entry.path and os.path.isdir(real):
                        out[entry.path] = real
    except OSError:
        pass
    return out


class EbpfBackend(Backend):
    name = "ebpf"

    @classmethod
    def probe(cls) -> tuple[bool, str]:
        return loader.probe()

    def __init__(self, rules: RuleSet, queue_size: int | None = None,
                 exclude_self: bool = True,
                 cache_dir: str | None = loader.objcache.CACHE_DIR) -> None:
        super().__init__(rules, queue_size)
        self.cache_dir = cache_dir      # compiled programs; None: compile every time
        self.exclude_self = exclude_self
        self.ringbuf_pages = ring_pages(queue_size)
        self.bpf: loader.objcache.Programs | None = None
        self.ring: RingReader | None = None
        self.decoder = Decoder(self.name)
        self.container = None
        self.watch_values: dict[tuple[int, int], WatchValue] = {}
        self.slots: dict[int, int] = {}         # rule id -> its bit in event.rules
        self.name_hashes: set[int] = set()      # watched_prefix
        self.ancestors: set[tuple[int, int]] = set()    # watch_ancestor
        self.specs: dict[int, SyscallSpec] = {}     # syscall_spec slot -> its value
        self.filters: list[tuple] = []          # rule_filters as last written

    # -- loading -----------------------------------------------------------------
    def start(self) -> None:
        ok, reason = self.probe()
        if not ok:
            raise BackendUnavailable(reason)
        tfs = loader.tracefs()
        assert tfs is not None
        dec = self.decoder
        dec.time_offset = time.time_ns() - time.monotonic_ns()
        specs = loader.syscall_specs(tfs)
        dec.tp_names, have_compat = loader.syscall_slots(specs)
        flags = loader.cflags(self.ringbuf_pages, have_compat, self.cache_dir)
        self.bpf = bpf = loader.load_programs(flags, tfs, self.cache_dir)
        spec_map = bpf[b"syscall_spec"]
        for slot, name in dec.tp_names.items():
            self.specs[slot] = specs[name]
            leaf = spec_map.Leaf()
            specs[name].fill(leaf)
            spec_map[spec_map.Key(slot)] = leaf
        dec.mounts = mount_points()
        self._sync_watches()            # while the kernel verifies the programs
        loader.attach_programs(bpf)
        self.ring = RingReader(bpf[b"events"].map_fd, self.ringbuf_pages * mmap.PAGESIZE)

    # -- rules -> the watched map ------------------------------------------------------
    def _host_path(self, path: str) -> str:
        return self.container.host_path(path) if self.container else path

    def _rule_entries(self, rule: Rule, bit: int = 0) -> list[tuple[tuple[int, int],
                                                                     WatchValue]]:
        """The watched map entries a rule makes: (dev, ino) -> the permission masks
        (self, child, subtree) and the rule slot bits behind them (self, child,
        subtree, entry by name); ``bit`` is the rule's slot bit."""
        mask = sum(PERM_BITS[p] for p in rule.perms)
        if rule.kind == "syscall":
            return []                   # every object: syscall_spec.pathless instead
        if rule.kind == "inode":
            return [((kernel_dev(rule.dev or 0), rule.inode or 0),
                     (mask, 0, 0, bit, 0, 0, 0))]
        assert rule.target is not None
        target = self._host_path(rule.target)
        if rule.kind == "dir":
            try:
                st = os.stat(target)
            except OSError as exc:
                raise RuleError(f"cannot watch {rule.target}: {exc.strerror}") from None
            return [((kernel_dev(st.st_dev), st.st_ino),
                     (mask, mask, mask, bit, bit, bit, 0))]
        parent = os.path.dirname(rule.target) or "/"
        try:
            st = os.stat(self._host_path(parent))
        except OSError as exc:
            raise RuleError(f"cannot watch {rule.target}: its directory {parent}: "
                            f"{exc.strerror}") from None
        # The parent's entries by name (the file replaced by a rename, or created
        # later: user space confirms the name), and the object itself by inode, whatever
        # name, link or mount reaches it.  A directory named by path= covers its entries
        # too (Linux audit: it is the parent item of operations on them).
        out = [((kernel_dev(st.st_dev), st.st_ino), (0, mask, 0, 0, 0, 0, bit))]
        try:
            own = os.stat(target)
        except OSError:
            return out
        entries = stat.S_ISDIR(own.st_mode)
        out.append(((kernel_dev(own.st_dev), own.st_ino),
                    (mask, mask if entries else 0, 0, bit, bit if entries else 0, 0, 0)))
        return out

    def _kernel_class(self, rule: Rule) -> tuple | None:
        """What the kernel compares for a path-less rule: rules alike share a slot."""
        try:
            return tuple(self.kernel_conds(rule))
        except RuleError:
            return None                 # refused when the conditions are written

    def _assign_slots(self) -> dict[int, int]:
        """Rule id -> slot, kept for a rule's lifetime; rules beyond the unique slots
        share the last one (user space then matches their objects by path).

        Path-less rules take the first slots, whose kernel conditions are kept in
        rule_filters; path-less rules with the same kernel conditions (the STIG and
        OSPP sets repeat `-F auid>=1000 -F auid!=unset` on many syscall lists) share
        one, so that a whole set is filtered in the kernel; the consumer then tells
        them apart by syscall, operation and their other fields (Rule.matches)."""
        ids = {rid for rid, _ in self.rules.items()}
        rules = self.rules.rules
        self.slots = {rid: s for rid, s in self.slots.items() if rid in ids}
        used = set(self.slots.values())
        free = (s for s in range(SHARED_SLOT) if s not in used)
        classes: dict[tuple, int] = {}
        for rid, slot in self.slots.items():
            if rules[rid].kind == "syscall" and slot < PATHLESS_SLOTS:
                cls = self._kernel_class(rules[rid])
                if cls is not None:
                    classes.setdefault(cls, slot)
        for rid in sorted(ids - set(self.slots),
                          key=lambda rid: (rules[rid].kind != "syscall", rid)):
            cls = self._kernel_class(rules[rid]) if rules[rid].kind == "syscall" else None
            if cls is not None and cls in classes:
                self.slots[rid] = classes[cls]
                continue
            self.slots[rid] = slot = next(free, SHARED_SLOT)
            if cls is not None and slot < PATHLESS_SLOTS:
                classes[cls] = slot
        slot_rules: dict[int, list[tuple[int, Rule]]] = {}
        for rid, rule in self.rules.items():
            slot_rules.setdefault(self.slots[rid], []).append((rid, rule))
        self.decoder.slot_rules = slot_rules
        self.decoder.path_targets = {r.target for r in self.rules
                                     if r.kind == "path" and r.target}
        return self.slots

    def _sync_watches(self) -> None:
        assert self.bpf is not None
        wanted: dict[tuple[int, int], WatchValue] = {}
        slots = self._assign_slots()
        for rid, rule in self.rules.items():
            for key, val in self._rule_entries(rule, 1 << slots[rid]):
                old = wanted.get(key, (0,) * len(val))
                wanted[key] = cast(WatchValue, tuple(a | b for a, b in
                                                     zip(old, val, strict=True)))
        table = self.bpf[b"watched"]
        for key, val in wanted.items():
            # file objects always: the kernel forgets a file's watch with its last link
            if self.watch_values.get(key) != val or val[3] and not val[4]:
                leaf = table.Leaf()
                (leaf.self, leaf.child, leaf.subtree,
                 leaf.rself, leaf.rchild, leaf.rsub, leaf.rname) = val
                k = table.Key()
                k.dev, k.ino = key
                table[k] = leaf
        for key in set(self.watch_values) - set(wanted):
            k = table.Key()
            k.dev, k.ino = key
            try:
                del table[k]
            except KeyError:
                pass
        if wanted != self.watch_values:
            gens = self.bpf[b"gens"]
            gkey = gens.Key(GEN.USER)
            gens[gkey] = gens.Leaf(gens[gkey].value + 1)     # the kernel's verdicts expire
        self.watch_values = wanted
        self._sync_names()
        self._sync_pathless(slots)
        self._set_config()

    # -- names, for failed syscalls (no inode changed: probes.c failed_event) -----------
    def _name_entries(self) -> tuple[set[int], set[tuple[int, int]]]:
        """Hashes of the watched paths (also as root-level symlinks name them: /bin ->
        usr/bin) and the (dev, ino) of the directories above them."""
        targets: list[tuple[str, bool]] = []
        for _rid, rule in self.rules.items():
            if rule.target is not None and rule.kind in ("dir", "path"):
                targets.append((os.path.normpath(rule.target), rule.kind == "path"))
        hashes: set[int] = set()
        ancestors: set[tuple[int, int]] = set()
        links = root_symlinks() if targets and self.container is None else {}
        for target, is_file in targets:
            names = {target}
            if self.container is None:
                names.add(os.path.realpath(target))
            for name in list(names):
                for link, real in links.items():
                    if name == real or name.startswith(real.rstrip("/") + "/"):
                        names.add(link + name[len(real):])
            hashes.update(path_hash(os.fsencode(n if n != "/" else "")) for n in names)
            # a file rule's directory is judged by what it grants to its entries
            d = os.path.dirname(target)
            if is_file:
                d = os.path.dirname(d)
            while True:
                try:
                    st = os.stat(self._host_path(d))
                    ancestors.add((kernel_dev(st.st_dev), st.st_ino))
                except OSError:
                    pass
                if d == "/" or not d:
                    break
                d = os.path.dirname(d)
        return hashes, ancestors

    def _sync_names(self) -> None:
        assert self.bpf is not None
        hashes, ancestors = self._name_entries()
        table = self.bpf[b"watched_prefix"]
        for h in hashes - self.name_hashes:
            table[table.Key(h)] = table.Leaf(1)
        for h in self.name_hashes - hashes:
            try:
                del table[table.Key(h)]
            except KeyError:
                pass
        table = self.bpf[b"watch_ancestor"]
        for key in ancestors ^ self.ancestors:
            k = table.Key()
            k.dev, k.ino = key
            if key in ancestors:
                table[k] = table.Leaf(1)
            else:
                try:
                    del table[k]
                except KeyError:
                    pass
        self.name_hashes, self.ancestors = hashes, ancestors

    # -- path-less rules -> syscall_spec.pathless and rule_filters -----------------------
    @staticmethod
    def kernel_conds(rule: Rule) -> list[tuple[int, int, int, int]]:
        """The (KF_*, REL_* bits, value, other KF_*) conditions of a path-less rule
        evaluated in the kernel: its -F fields and -C comparisons on what the kernel
        reads, those no event carries first, at most MAX_KCONDS; the consumer
        evaluates every other one."""
        conds = [(c.name in FIELDS and not FIELDS[c.name].where & Where.CONSUMER,
                  (int(KERNEL_FIELDS[c.name]), KERNEL_OPS[c.op], int(c.value), 0))
                 for c in rule.conds if c.name in KERNEL_FIELDS]
        conds += [(not c.in_consumer,
                   (int(KERNEL_FIELDS[c.left]), KERNEL_OPS[c.op], 0,
                    int(KERNEL_FIELDS[c.right])))
                  for c in rule.compares
                  if c.left in KERNEL_FIELDS and c.right in KERNEL_FIELDS]
        conds.sort(key=lambda kc: not kc[0])
        if any(kernel_only for kernel_only, _ in conds[MAX_KCONDS:]):
            raise RuleError(f"{rule.text()}: more than {MAX_KCONDS} conditions on "
                            "credentials only the kernel sees")
        return [kc for _, kc in conds[:MAX_KCONDS]]

    def _sync_pathless(self, slots: dict[int, int]) -> None:
        """Mark each followed syscall with the slots of the path-less rules on it, and
        put each rule's kernel conditions in its slot."""
        assert self.bpf is not None
        masks = dict.fromkeys(self.specs, 0)
        conds: list[list[tuple[int, int, int, int]]] = [[] for _ in range(PATHLESS_SLOTS)]
        for rid, rule in self.rules.items():
            if rule.kind != "syscall":
                continue
            slot = slots[rid]
            if slot < PATHLESS_SLOTS:
                conds[slot] = self.kernel_conds(rule)
            elif any(not FIELDS[c.name].where & Where.CONSUMER for c in rule.conds) or any(
                    not c.in_consumer for c in rule.compares):
                raise RuleError(f"{rule.text()}: the kernel keeps the conditions of "
                                f"{PATHLESS_SLOTS} path-less rules, and only it sees "
                                "this rule's (suid, fsuid, egid, sgid, fsgid)")
            b32 = any(c.name == "arch" and c.value == "b32" for c in rule.conds)
            for spec_slot, name in self.decoder.tp_names.items():
                if (spec_slot >= COMPAT_BASE) == b32 and (
                        not rule.syscalls or name in rule.syscalls):
                    masks[spec_slot] |= 1 << slot
        # the slots beyond pass everything in the kernel (user space decides)
        filters = [tuple(c) for c in conds]
        if filters != self.filters:
            table = self.bpf[b"rule_filters"]
            leaf = table.Leaf()
            leaf.needs = sum({1 << kc[0] | 1 << kc[3] for c in filters for kc in c})
            for i, slot_conds in enumerate(filters):
                for j in range(MAX_KCONDS):
                    k = leaf.slot[i].c[j]
                    k.field, k.rel, k.value, k.other = (
                        slot_conds[j] if j < len(slot_conds) else (KF.NONE, REL.ANY, 0, 0))
            table[table.Key(0)] = leaf
            self.filters = filters
        spec_map = self.bpf[b"syscall_spec"]
        for spec_slot, mask in masks.items():
            spec = self.specs[spec_slot]
            if spec.pathless != mask:
                self.specs[spec_slot] = spec = replace(spec, pathless=mask)
                leaf = spec_map.Leaf()
                spec.fill(leaf)
                spec_map[spec_map.Key(spec_slot)] = leaf

    def _set_config(self, **changes: int) -> None:
        assert self.bpf is not None
        cfg_map = self.bpf[b"config"]
        cfg = cfg_map[0]
        cfg.have_watches = 1 if self.watch_values else 0
        cfg.file_watches = 1 if any(r.kind in ("inode", "path") for r in self.rules) else 0
        cfg.self_tgid = os.getpid() if self.exclude_self else 0
        for name, value in changes.items():
            setattr(cfg, name, value)
        cfg_map[0] = cfg

    def add_rule(self, rid: int, rule: Rule) -> None:
        self._rule_entries(rule)        # refuse before changing anything
        self._sync_watches()

    def remove_rule(self, rid: int, rule: Rule) -> None:
        self._sync_watches()

    def watched_count(self) -> int:
        return len(self.watch_values)

    # -- scopes ----------------------------------------------------------------------
    def set_container(self, container) -> None:
        self.container = container
        self.decoder.container = container

    def restrict_to_mount_namespace(self, mntns: int | None) -> None:
        self._set_config(mntns=mntns or 0)

    def add_process(self, pid: int, children: bool = True, announce: bool = True,
                    exclusive: bool = True, key: str | None = None) -> None:
        """announce=False: the process is about to exec; its record comes with the exec.
        exclusive=False (the daemon): the rules keep applying to every process, and
        everything this one touches is reported besides, with ``key``."""
        from ...procfs import process_tree, read_process_state
        assert self.bpf is not None
        if not os.path.exists(f"/proc/{pid}"):
            raise RuleError(f"no process {pid}")
        pids = process_tree(pid) if children else [pid]
        self._set_config(audits=1)      # the kernel looks processes up from now on
        table = self.bpf[b"audited"]
        flag = AUDIT.CHILDREN if children else 0
        if not exclusive or not len(self.rules):
            flag |= AUDIT.ALL_PATHS
        dec = self.decoder
        for p in pids:
            table[table.Key(p)] = table.Leaf(flag)
            dec.audited.add(p)
            if key:
                dec.audit_keys[p] = key
            st = read_process_state(p, "initial" if p == pid else "descendant")
            if st is not None and announce:
                if self.container is not None:
                    st.container = self.container.identity()
                dec.batch.append(st)
        if exclusive:
            self._set_config(scope_processes=1)

    def audited_pids(self) -> set[int]:
        """The processes of per-process audits (those forked since included)."""
        return set(self.decoder.audited)

    def remove_process(self, pid: int) -> None:
        assert self.bpf is not None
        table = self.bpf[b"audited"]
        try:
            del table[table.Key(pid)]
        except KeyError:
            raise RuleError(f"process {pid} is not audited") from None
        self.decoder.audited.discard(pid)
        self.decoder.audit_keys.pop(pid, None)

    # -- events ----------------------------------------------------------------------
    def read(self, timeout: float) -> list[Event | ProcessState]:
        assert self.ring is not None
        if self.ring.wait(timeout):
            self.ring.consume(self.decoder.on_record, READ_BATCH)
        out = self.decoder.take()
        if self.decoder.renamed_targets:
            # a watched file was created or replaced: mark its new inode
            self.decoder.renamed_targets = False
            self._sync_watches()
        return out

    def _counter(self, idx: int) -> int:
        assert self.bpf is not None
        values = self.bpf[b"counters"][ctypes.c_int(idx)]
        return int(sum(values))

    def submitted(self) -> int:
        """Records the kernel submitted to the ring buffer (for tests and status)."""
        return self._counter(CNT.SUBMITTED)

    def backlog(self) -> dict[str, int]:
        ring = self.ring
        if ring is None:
            return {}
        return {"ring_bytes": ring.pending(), "ring_size": ring.size}

    def lost(self) -> dict[str, int]:
        if self.bpf is None:
            return {"ringbuf": 0}
        out = {"ringbuf": self._counter(CNT.LOST),
               "pending_full": self._counter(CNT.PENDING_FULL)}
        compat = self._counter(CNT.COMPAT)
        if compat:      # 32-bit syscalls: not judged, so possibly unreported operations
            out["compat_syscalls"] = compat
        deep = self._counter(CNT.TOO_DEEP)
        if deep:        # directories deeper than the kernel's walk below any cached one
            out["too_deep"] = deep
        names = self._counter(CNT.TOO_MANY_NAMES)
        if names:       # a file with more links than the kernel judges, none watched
            out["too_many_names"] = names
        if self.decoder.undecodable:    # records the decoder could not read
            out["undecodable"] = self.decoder.undecodable
        return out

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
