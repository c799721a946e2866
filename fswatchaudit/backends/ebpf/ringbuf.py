"""Batch reader of a BPF ring buffer map, mapped straight into this process.

bcc's ring_buffer_poll() calls a Python function through ctypes for every record,
which costs more than decoding the record itself.  This reader maps the ring the way
libbpf does (kernel/bpf/ringbuf.c, tools/lib/bpf/ringbuf.c) and hands back the records
of one poll as (offset, length) pairs into one memoryview, so a decoder can run
struct.unpack_from over them in a plain loop.

Layout of the mapping: page 0 is the consumer position (the only page user space may
write); from page 1 on, the producer position page, then the data area mapped twice in
a row so that a record wrapping around the end is contiguous.  Each record starts with
an 8-byte header: u32 length with a busy and a discard bit, u32 page offset.

The reader takes at most ``limit`` records per call and hands their space back as it
goes: the consumer never holds more than one batch, and when it falls behind, the ring
fills and the kernel counts what it cannot reserve (backpressure lands in the kernel's
counted loss, not in this process's memory).

Producers that send without waking the reader (BPF_RB_NO_WAKEUP, to spare the audited
process a wakeup per record) are caught by wait(), which also looks every few ms.
"""
from __future__ import annotations

import ctypes
import mmap
import select
import time
from collections.abc import Callable

HDR_SIZE = 8                  # BPF_RINGBUF_HDR_SZ
BUSY_BIT = 1 << 31            # BPF_RINGBUF_BUSY_BIT: reserved, not yet committed
DISCARD_BIT = 1 << 30         # BPF_RINGBUF_DISCARD_BIT: committed as discarded
LEN_MASK = ~(BUSY_BIT | DISCARD_BIT) & 0xFFFFFFFF
RECORD_ALIGN = 8
POLL_INTERVAL = 0.01         # seconds between looks when no wakeup came


class RingReader:
    """Consumer of one BPF_MAP_TYPE_RINGBUF map (map_fd, data size in bytes)."""

    def __init__(self, map_fd: int, size: int) -> None:
        if size <= 0 or size & (size - 1) or size % mmap.PAGESIZE:
            raise ValueError(f"ring buffer size {size} is not a power-of-2 number of pages")
        self.size = size
        self.mask = size - 1
        page = mmap.PAGESIZE
        self._cons_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod_map = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED,
                                   mmap.PROT_READ, offset=page)
        # one aligned 8-byte load or store each: the kernel reads consumer_pos concurrently
        self._cons = ctypes.c_uint64.from_buffer(self._cons_map)
        self._prod_view = memoryview(self._prod_map)
        self._prod = self._prod_view[:8].cast("Q")
        self.data = self._prod_view[page:]
        self._len = self.data.cast("I")      # u32 view, for the record headers
        self._poll = select.epoll()
        self._poll.register(map_fd, select.EPOLLIN)

    def wait(self, timeout: float) -> bool:
        """Wait up to timeout seconds for data; True when some may be there."""
        deadline = time.monotonic() + timeout
        while True:
            if self._cons.value != self._prod[0]:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # producers may send without a wakeup: look again after a short while
            if self._poll.poll(min(left, POLL_INTERVAL)):
                return True

    def consume(self, handle: Callable[[memoryview, int, int], None],
                limit: int = 1 << 62) -> int:
        """Call handle(data, offset, length) for the committed records in order, at most
        ``limit`` of them, releasing their space to the kernel.  Returns how many
        records were handled."""
        cons = self._cons.value
        mask = self.mask
        lens = self._len
        data = self.data
        n = 0
        while True:
            prod = self._prod[0]
            if cons >= prod:
                break
            while cons < prod:
                if n >= limit:
                    return n
                off = cons & mask
                hdr = lens[off >> 2]
                if hdr & BUSY_BIT:
                    prod = -1                      # the producer is still writing it
                    break
                length = hdr & LEN_MASK
                if not hdr & DISCARD_BIT:
                    handle(data, off + HDR_SIZE, length)
                    n += 1
                cons += (length + HDR_SIZE + RECORD_ALIGN - 1) & ~(RECORD_ALIGN - 1)
                self._cons.value = cons            # space back to the kernel at once
            if prod < 0:
                break
        return n

    def pending(self) -> int:
        """Bytes the kernel has produced that are not consumed yet."""
        return int(self._prod[0]) - int(self._cons.value)

    def close(self) -> None:
        self._poll.close()
        del self._len, self.data, self._prod
        self._prod_view.release()
        del self._cons
        self._prod_map.close()
        self._cons_map.close()
