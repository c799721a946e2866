"""The mmap'd ring buffer reader against a real BPF ring buffer: order, wrap-around,
discarded records, and the space it gives back to the kernel."""
import os
import struct
from importlib import resources

import pytest

from fswatchaudit.backends import probe

EBPF = probe("ebpf")
pytestmark = pytest.mark.skipif(not EBPF.usable, reason=f"eBPF backend: {EBPF.reason}")

PAGES = 1
PROG = r"""
struct rec { u64 seq; u32 len; u32 pad; char fill[128]; };
BPF_RINGBUF_OUTPUT(out, PAGES);
BPF_ARRAY(state, u64, 2);          /* 0: next sequence number, 1: refused records */
BPF_PERCPU_ARRAY(scratch, struct rec, 1);

/* Every getppid() of this process sends one record: 16..143 bytes (not a multiple of
 * 8, so padding is exercised), or every fifth one a reserved and discarded record. */
RAW_TRACEPOINT_PROBE(sys_enter)
{
    if ((bpf_get_current_pid_tgid() >> 32) != TGID || ctx->args[1] != NR_GETPPID)
        return 0;
    u32 zero = 0, one = 1;
    u64 *seq = state.lookup(&zero);
    u64 *fail = state.lookup(&one);
    struct rec *r = scratch.lookup(&zero);
    if (!seq || !fail || !r)
        return 0;
    u64 s = *seq;
    *seq = s + 1;
    if (s % 5 == 4) {
        struct rec *d = out.ringbuf_reserve(sizeof(struct rec));
        if (!d) {
            (*fail)++;
            return 0;
        }
        out.ringbuf_discard(d, 0);
        return 0;
    }
    u32 len = 16 + s % 128;
    r->seq = s;
    r->len = len;
    for (int i = 0; i < 128; i++)
        r->fill[i] = (char)(s + i);
    if (out.ringbuf_output(r, len & 0xff, 0))
        (*fail)++;
    return 0;
}
"""
NR_GETPPID = 110               # x86_64
HEAD = struct.Struct("<QI")


@pytest.fixture(scope="module")
def ring():
    from bcc import BPF

    from fswatchaudit.backends.ebpf.ringbuf import RingReader
    if os.uname().machine != "x86_64":
        pytest.skip("the test program uses the x86_64 getppid number")
    if not os.path.isdir(f"/lib/modules/{os.uname().release}/build"):
        os.environ.setdefault("BCC_KERNEL_SOURCE",
                              str(resources.files("fswatchaudit.backends.ebpf").joinpath("include")))
    bpf = BPF(text=PROG.encode(), cflags=[f"-DPAGES={PAGES}", f"-DTGID={os.getpid()}",
                                 f"-DNR_GETPPID={NR_GETPPID}"])
    table = bpf[b"out"]
    reader = RingReader(table.map_fd, PAGES * os.sysconf("SC_PAGE_SIZE"))
    yield bpf, reader
    reader.close()
    bpf.cleanup()


def test_records_in_order_across_wrap_around_and_discards(ring):
    bpf, reader = ring
    got = []

    def handle(data, off, length):
        seq, ln = HEAD.unpack_from(data, off)
        assert length == ln == 16 + seq % 128
        assert bytes(data[off + 16:off + length]) == bytes(
            (seq + i) & 0xFF for i in range(length - 16))
        got.append(seq)

    total = 0
    for _ in range(50):                 # 50 rounds of 20 records: ~30 KiB through 4 KiB
        for _ in range(20):
            os.getppid()
        assert reader.wait(0)
        total += reader.consume(handle)
    state = bpf[b"state"]
    assert state[state.Key(1)].value == 0          # the reader always made room in time
    assert got == [s for s in range(1000) if s % 5 != 4]
    assert total == len(got)
    assert not reader.wait(0)


def test_a_full_ring_refuses_until_the_reader_frees_space(ring):
    bpf, reader = ring
    state = bpf[b"state"]
    start = state[state.Key(0)].value
    failed0 = state[state.Key(1)].value
    for _ in range(100):                # ~10 KiB of records do not fit in 4 KiB
        os.getppid()
    failed = state[state.Key(1)].value - failed0
    seen = []
    reader.consume(lambda data, off, n: seen.append(HEAD.unpack_from(data, off)[0]))
    assert failed > 0
    # the records that fitted, then (space for a small one may remain) refusals only
    assert seen == [s for s in range(start, start + len(seen) + 100) if s % 5 != 4][:len(seen)]
    assert seen[0] in (start, start + 1)
    os.getppid()                        # room again
    reader.consume(lambda data, off, n: seen.append(HEAD.unpack_from(data, off)[0]))
    assert seen[-1] == start + 100 or (start + 100) % 5 == 4
    assert state[state.Key(1)].value - failed0 == failed
