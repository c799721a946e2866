"""Struct member offsets of the running kernel, read from its BTF (/sys/kernel/btf/vmlinux).

A small reader of the BTF format (the kernel's Documentation/bpf/btf.rst): enough to
find a struct by name and the byte offset of a member, following anonymous unions and
structs.  Written here rather than taken from a library because no maintained Python
package reads BTF, and the format is a flat array of small records.
"""
from __future__ import annotations

import struct

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F

# BTF kinds (btf.h) and the size of the data that follows each type record.
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 7, 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_FLOAT = 12, 13, 14, 15, 16
KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 17, 18, 19
# Bytes that follow a type record, by kind: (fixed, per member/entry of vlen).
EXTRA_BYTES = [(0, 0)] * 32
EXTRA_BYTES[KIND_INT] = (4, 0)
EXTRA_BYTES[KIND_ARRAY] = (12, 0)
EXTRA_BYTES[KIND_STRUCT] = EXTRA_BYTES[KIND_UNION] = (0, 12)
EXTRA_BYTES[KIND_ENUM] = (0, 8)
EXTRA_BYTES[KIND_FUNC_PROTO] = (0, 8)
EXTRA_BYTES[KIND_VAR] = (4, 0)
EXTRA_BYTES[KIND_DATASEC] = (0, 12)
EXTRA_BYTES[KIND_DECL_TAG] = (4, 0)
EXTRA_BYTES[KIND_ENUM64] = (0, 12)
TYPE_RECORD = struct.Struct("<III")        # name_off, info, size/type
MEMBER_RECORD = struct.Struct("<III")      # name_off, type, offset


class BTFError(RuntimeError):
    pass


class BTF:
    def __init__(self, path: str = VMLINUX_BTF) -> None:
        with open(path, "rb") as fh:
            data = fh.read()
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BTFError(f"{path} is not BTF (magic {magic:#x})")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self.data = data
        self.types_start = hdr_len + type_off
        self.types_end = self.types_start + type_len
        self.strings = hdr_len + str_off
        self.str_end = self.strings + str_len
        # type id -> offset of its record; struct/union name -> ids
        self.offsets: list[int] = [0]
        self.by_name: dict[str, list[int]] = {}
        self._index()

    def _name(self, off: int) -> str:
        start = self.strings + off
        return self.data[start:self.data.index(b"\0", start)].decode()

    def _index(self) -> None:
        data, pos, end = self.data, self.types_start, self.types_end
        unpack = TYPE_RECORD.unpack_from
        offsets = self.offsets
        by_name = self.by_name
        name = self._name
        extra = EXTRA_BYTES
        wanted = (KIND_STRUCT, KIND_UNION)
        while pos < end:
            name_off, info, _ = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            offsets.append(pos)
            if kind in wanted and name_off:
                by_name.setdefault(name(name_off), []).append(len(offsets) - 1)
            fixed, per_member = extra[kind]
            pos += 12 + fixed + per_member * (info & 0xFFFF)

    def _members(self, type_id: int):
        pos = self.offsets[type_id]
        _, info, _ = TYPE_RECORD.unpack_from(self.data, pos)
        kflag = info >> 31
        for i in range(info & 0xFFFF):
            name_off, mtype, offset = MEMBER_RECORD.unpack_from(self.data, pos + 12 + 12 * i)
            bit = offset & 0xFFFFFF if kflag else offset
            yield (self._name(name_off) if name_off else ""), mtype, bit

    def _resolve(self, type_id: int) -> int:
        """Skip typedefs and qualifiers."""
        while True:
            _, info, ref = TYPE_RECORD.unpack_from(self.data, self.offsets[type_id])
            kind = (info >> 24) & 0x1F
            if kind in (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT,
                        KIND_TYPE_TAG):
                type_id = ref
                continue
            return type_id

    def _find(self, type_id: int, member: str) -> int | None:
        for name, mtype, bit in self._members(type_id):
            if name == member:
                return bit
            if not name:  # anonymous struct/union: look inside
                inner = self._resolve(mtype)
                found = self._find(inner, member)
                if found is not None:
                    return bit + found
        return None

    def struct_id(self, struct_name: str) -> int:
        for tid in self.by_name.get(struct_name, []):
            _, info, _ = TYPE_RECORD.unpack_from(self.data, self.offsets[tid])
            if info & 0xFFFF:   # skip empty forward-ish definitions
                return tid
        raise BTFError(f"struct {struct_name} is not in the kernel's BTF")

    def offset(self, path: str) -> int:
        """Byte offset of 'struct.member[.member...]', e.g. 'file.f_path.dentry'."""
        struct_name, *members = path.split(".")
        tid = self.struct_id(struct_name)
        total = 0
        for m in members:
            bit = self._find(tid, m)
            if bit is None:
                raise BTFError(f"struct member {path} is not in the kernel's BTF")
            if bit % 8:
                raise BTFError(f"{path} is a bit field")
            total += bit // 8
            mtype = self._member_type(tid, m)
            tid = self._resolve(mtype) if mtype is not None else tid
        return total

    def _member_type(self, type_id: int, member: str) -> int | None:
        for name, mtype, _ in self._members(type_id):
            if name == member:
                return mtype
            if not name:
                inner = self._member_type(self._resolve(mtype), member)
                if inner is not None:
                    return inner
        return None

    def func_id(self, func_name: str) -> int | None:
        """The type id of a kernel function (a kfunc a program may call), or None."""
        data, unpack = self.data, TYPE_RECORD.unpack_from
        for tid in range(1, len(self.offsets)):
            name_off, info, _ = unpack(data, self.offsets[tid])
            if (info >> 24) & 0x1F == KIND_FUNC and name_off and \
                    self._name(name_off) == func_name:
                return tid
        return None

    def open_words_id(self, struct_name: str) -> int | None:
        """The id of struct_name when it is one open-ended array of integers from its
        first byte (``struct bpf_raw_tracepoint_args { __u64 args[0]; }``): a view of
        kernel memory as that struct may be read at any offset.  None otherwise."""
        try:
            tid = self.struct_id(struct_name)
        except BTFError:
            return None
        members = list(self._members(tid))
        if len(members) != 1 or members[0][2] != 0:
            return None
        array = self.offsets[self._resolve(members[0][1])]
        _, info, _ = TYPE_RECORD.unpack_from(self.data, array)
        if (info >> 24) & 0x1F != KIND_ARRAY:
            return None
        elem, _index, nelems = struct.unpack_from("<III", self.data, array + 12)
        _, einfo, _ = TYPE_RECORD.unpack_from(self.data, self.offsets[self._resolve(elem)])
        if nelems or (einfo >> 24) & 0x1F != KIND_INT:
            return None
        return tid

    def size(self, struct_name: str) -> int:
        _, _, size = TYPE_RECORD.unpack_from(self.data, self.offsets[self.struct_id(struct_name)])
        return size
