"""The hostile guest: a well-behaved front end whose ring holds crafted descriptor chains.

Chains start as valid blk requests (header, data, status; some through an indirect table) and
are then bent: a field set to an edge value (address at a region boundary, at the end of memory
or wrapping 2^64; length 0 or near 2^32; flags with INDIRECT/NEXT/WRITE mixed; next out of the
table), extra descriptors, foreign heads, an avail index that jumps. After the kick the daemon
must either complete every request made available or mark the device broken (hang up with one
log line), and may have written only its used ring and the buffers the descriptors (direct or in
an indirect table) mark device-writable; the canaries around the regions stay intact.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypothesis import strategies as st

from lab.fuzz.memory import REGION_SIZE, SIZE, GuardedMemory
from lab.fuzz.messages import edge, mem_table
from lab.fuzz.target import Daemon, Finding
from lab.fuzz.wire import Msg, case_session
from lab.virtio.vhost_user import Request as R

DESC = struct.Struct("<QIHH")
BLK_HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")
NEXT, WRITE, INDIRECT = 1, 2, 4
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
F_INDIRECT, F_EVENT_IDX = 1 << 28, 1 << 29
BASE_FEATURES = 1 << 32 | 1 << 30
PROTOCOL = 1 << 0 | 1 << 3 | 1 << 9  # MQ, REPLY_ACK, CONFIG
DESC_GPA, AVAIL_GPA, USED_GPA = 0x1000, 0x2000, 0x3000
MAX_TABLE_BYTES = 1 << 16  # an indirect table larger than this is refused anyway (queue size * 16)


def table_gpa(slot: int) -> int:
    return 0x8000 + 0x1000 * (slot % 4)


def buffer_gpa(i: int) -> int:
    """Request header at the start, status byte at +0x800."""
    return 0x10000 + 0x1000 * (i % 16)


def data_gpa(i: int) -> int:
    return 0x40000 + 0x4000 * (i % 16)


Desc = tuple[int, int, int, int]  # addr, len, flags, next


@dataclass(frozen=True)
class RingCase:
    size: int
    features: int
    descs: tuple[tuple[int, Desc], ...]  # (index, descriptor) in the ring's table
    tables: tuple[tuple[int, tuple[Desc, ...]], ...]  # (slot, entries) of indirect tables
    headers: tuple[tuple[int, int, int, bytes], ...]  # (buffer, type, sector, payload after it)
    heads: tuple[int, ...]
    jump: int = 0  # added to the avail index beyond the heads
    avail_flags: int = 0
    used_event: int = 0
    rounds: int = 1


def _chain(reqno: int, rtype: int, data: list[int], split: bool) -> list[Desc]:
    """A blk request's descriptors (next fields relative: filled in by the layout)."""
    buf = buffer_gpa(reqno)
    out = [(buf, 8, 0, 0), (buf + 8, 8, 0, 0)] if split else [(buf, 16, 0, 0)]
    writable = WRITE if rtype in (T_IN, T_GET_ID) else 0
    for k, length in enumerate(data):
        out.append((data_gpa(reqno) + 0x1000 * k, length, writable, 0))
    out.append((buf + 0x800, 1, WRITE, 0))
    return out


def _linked(descs: list[Desc], first: int) -> list[Desc]:
    return [(a, n, f | (NEXT if k < len(descs) - 1 else 0), first + k + 1) for k, (a, n, f, _) in enumerate(descs)]


@st.composite
def ring_cases(draw: st.DrawFn) -> RingCase:
    size = draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128, 256]))
    features = BASE_FEATURES | draw(st.sampled_from([0, F_INDIRECT, F_EVENT_IDX, F_INDIRECT | F_EVENT_IDX]))
    descs: dict[int, Desc] = {}
    tables: dict[int, list[Desc]] = {}
    headers, heads = [], []
    free = 0
    for reqno in range(draw(st.integers(1, 4))):
        rtype = draw(st.sampled_from([T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES, 7, 0xFFFFFFFF]))
        sector = draw(st.sampled_from([0, 1, 8, (16 << 20) // 512 - 1, (16 << 20) // 512, 1 << 63]) | edge("Q"))
        data = draw(st.lists(st.sampled_from([512, 4096, 16, 1]) | st.integers(1, 1 << 14), max_size=3))
        payload = b""
        if rtype in (T_DISCARD, T_WRITE_ZEROES):
            segs = draw(st.lists(st.tuples(edge("Q"), edge("I"), st.sampled_from([0, 1, 2])), min_size=1, max_size=3))
            payload = b"".join(SEGMENT.pack(s & (1 << 64) - 1, c & 0xFFFFFFFF, f) for s, c, f in
                               (tuple(v if isinstance(v, int) else 0 for v in seg) for seg in segs))
            data = [len(payload)]
        headers.append((reqno, rtype, sector if isinstance(sector, int) else 0, payload))
        chain = _chain(reqno, rtype, data, draw(st.booleans()))
        if payload:  # discard/write-zeroes segments travel right behind the header
            chain[-2] = (buffer_gpa(reqno) + 16, len(payload), 0, 0)
        if features & F_INDIRECT and draw(st.booleans()) and free < size:  # through an indirect table
            tables[reqno] = _linked(chain, 0)
            descs[free] = (table_gpa(reqno), 16 * len(chain), INDIRECT, 0)
            heads.append(free)
            free += 1
        elif free + len(chain) <= size:
            for k, d in enumerate(_linked(chain, free)):
                descs[free + k] = d
            heads.append(free)
            free += len(chain)
    # Mostly a few bends, often none: enough valid chains to exercise the data path too.
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 4]))):  # bend one field of one descriptor
        in_table = bool(tables) and draw(st.booleans())
        if in_table:
            slot = draw(st.sampled_from(sorted(tables)))
            entries = tables[slot]
            k = draw(st.integers(0, len(entries) - 1))
            entries[k] = _bend(draw, entries[k], size)
        elif descs:
            k = draw(st.sampled_from(sorted(descs)))
            descs[k] = _bend(draw, descs[k], size)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # descriptors out of nowhere
        descs[draw(st.integers(0, size - 1))] = _bend(draw, (0, 0, 0, 0), size, fields=4)
    if draw(st.sampled_from([False, False, False, True])):  # heads of no chain we built
        heads += draw(st.lists(st.integers(0, size + 2), min_size=1, max_size=2))
    if not heads:
        heads = [0]
    heads = heads[: size]
    return RingCase(
        size=size,
        features=features,
        descs=tuple(sorted(descs.items())),
        tables=tuple((slot, tuple(entries)) for slot, entries in sorted(tables.items())),
        headers=tuple(headers),
        heads=tuple(heads),
        jump=draw(st.sampled_from([0] * 8 + [1, size, size + 1, 0x8000, 0xFFFF])),
        avail_flags=draw(st.sampled_from([0, 1])),
        used_event=draw(st.integers(0, 0xFFFF)),
        rounds=draw(st.integers(1, 2)),
    )


_ADDRESSES = [0, DESC_GPA, USED_GPA, AVAIL_GPA, table_gpa(0), REGION_SIZE - 1, REGION_SIZE - 8, REGION_SIZE - 16,
              REGION_SIZE - 512, REGION_SIZE, SIZE - 1, SIZE - 16, SIZE - 512, SIZE, SIZE + 4096, 1 << 63,
              (1 << 64) - 1, (1 << 64) - 16, (1 << 64) - 512]
_LENGTHS = [0, 1, 2, 8, 15, 16, 17, 32, 511, 512, 513, 4096, 8192, REGION_SIZE, SIZE, 1 << 31, (1 << 32) - 1]
_FLAGS = [0, NEXT, WRITE, NEXT | WRITE, INDIRECT, INDIRECT | NEXT, INDIRECT | WRITE, 7]


def _bend(draw: st.DrawFn, desc: Desc, size: int, fields: int = 1) -> Desc:
    values = list(desc)
    for _ in range(fields):
        k = draw(st.integers(0, 3))
        values[k] = draw([
            st.sampled_from(_ADDRESSES) | st.integers(0, (1 << 64) - 1),
            st.sampled_from(_LENGTHS) | st.integers(0, (1 << 32) - 1),
            st.sampled_from(_FLAGS) | st.integers(0, 0xFFFF),
            st.integers(0, size + 2) | st.just(0xFFFF),
        ][k])
    return tuple(values)  # type: ignore[return-value]


# ---- running a case ----------------------------------------------------------------------------


def _handshake(case: RingCase) -> list[Msg]:
    q = lambda gpa: f"qva:{gpa:#x}"
    u64 = lambda request, value, fds=(): Msg(request, 1, (("Q", value),), fds)
    state = lambda request, num: Msg(request, 1, (("I", 0), ("I", num)))
    return [
        u64(R.SET_PROTOCOL_FEATURES, PROTOCOL),
        Msg(R.SET_OWNER),
        u64(R.SET_FEATURES, case.features),
        mem_table(),
        state(R.SET_VRING_NUM, case.size),
        state(R.SET_VRING_BASE, 0),
        Msg(R.SET_VRING_ADDR, 1, (("I", 0), ("I", 0), ("Q", q(DESC_GPA)), ("Q", q(USED_GPA)), ("Q", q(AVAIL_GPA)),
                                  ("Q", USED_GPA))),
        u64(R.SET_VRING_CALL, 0, ("eventfd",)),
        u64(R.SET_VRING_KICK, 0, ("kick",)),
        state(R.SET_VRING_ENABLE, 1),
    ]


def _lay_out(memory: GuardedMemory, case: RingCase) -> None:
    for index, desc in case.descs:
        memory.write(DESC_GPA + 16 * index, DESC.pack(*desc))
    for slot, entries in case.tables:
        memory.write(table_gpa(slot), b"".join(DESC.pack(*d) for d in entries))
    for buf, rtype, sector, payload in case.headers:
        memory.write(buffer_gpa(buf), BLK_HEADER.pack(rtype, 0, sector) + payload)
    memory.write(AVAIL_GPA, struct.pack("<H", case.avail_flags))
    memory.write(AVAIL_GPA + 4 + 2 * case.size, struct.pack("<H", case.used_event))


def _publish(memory: GuardedMemory, expected: bytearray, case: RingCase, idx: int) -> int:
    """Make the heads available; `expected` (the memory as only we changed it) follows."""

    def write(gpa: int, value: int) -> None:
        memory.write(gpa, struct.pack("<H", value))
        struct.pack_into("<H", expected, gpa, value)

    for head in case.heads:
        write(AVAIL_GPA + 4 + 2 * (idx % case.size), head)
        idx = (idx + 1) & 0xFFFF
    idx = (idx + case.jump) & 0xFFFF
    write(AVAIL_GPA + 2, idx)
    return idx


def writable_ranges(image: bytes | bytearray, size: int) -> list[tuple[int, int]]:
    """Where the device may write, read from a snapshot: its used ring, and every buffer a
    descriptor of the table (or of a table an INDIRECT descriptor points at) marks writable."""
    ranges = [(USED_GPA, USED_GPA + 6 + 8 * size)]

    def add(table: bytes) -> list[Desc]:
        entries = [DESC.unpack_from(table, off) for off in range(0, len(table) - 15, 16)]
        ranges.extend((a, min(a + n, SIZE)) for a, n, f, _ in entries if f & WRITE and a < SIZE)
        return entries

    for addr, length, flags, _ in add(image[DESC_GPA : DESC_GPA + 16 * size]):
        if flags & INDIRECT and addr < SIZE:
            add(image[addr : addr + min(length, MAX_TABLE_BYTES)])
    return ranges


def foreign_writes(before: bytes | bytearray, after: bytes, allowed: list[tuple[int, int]]) -> list[int]:
    """Guest-physical addresses that changed outside `allowed`."""
    bad = []
    for page in range(0, len(before), 4096):
        if before[page : page + 4096] == after[page : page + 4096]:
            continue
        for gpa in range(page, page + 4096):
            if before[gpa] != after[gpa] and not any(s <= gpa < e for s, e in allowed):
                bad.append(gpa)
    return bad


def run(daemon: Daemon, case: RingCase) -> str:
    """One case; raises Finding. Returns "completed" or "broken"."""
    with case_session(daemon) as (wire, memory):
        for msg in _handshake(case):
            wire.send(msg)
        wire.probe("the handshake")
        if wire.closed:
            raise Finding("the daemon refused a valid handshake")
        _lay_out(memory, case)
        before = bytearray(memory.snapshot())
        allowed = writable_ranges(before, case.size)
        idx = 0
        for round_ in range(case.rounds):
            idx = _publish(memory, before, case, idx)
            wire.kick()
            wire.probe(f"kick {round_}")
            wire.probe(f"kick {round_}")  # a second round trip: the loop has processed the rings
            if wire.closed:
                break
        if not wire.closed:
            wire.send(Msg(R.GET_VRING_BASE, 1, (("I", 0), ("I", 0))))
            wire.probe("GET_VRING_BASE")
        after = memory.snapshot()
        used_idx = struct.unpack_from("<H", after, USED_GPA + 2)[0]
        if not wire.closed and used_idx != idx:
            raise Finding(f"device neither completed the requests (used idx {used_idx}, avail idx {idx}) "
                          "nor was marked broken")
        bad = foreign_writes(before, after, allowed + writable_ranges(after, case.size))
        if bad:
            raise Finding(f"the device wrote outside its used ring and writable buffers: "
                          f"{len(bad)} bytes, first at {bad[0]:#x}")
    return "broken" if wire.closed else "completed"


SEEDS: dict[str, RingCase] = {
    name: RingCase(size, BASE_FEATURES | F_INDIRECT, descs, tables, ((0, T_IN, 0, b""),), heads, jump)
    for name, size, descs, tables, heads, jump in [
        ("head >= size", 16, (), (), (16,), 0),
        ("next >= size", 16, ((0, (buffer_gpa(0), 16, NEXT, 16)),), (), (0,), 0),
        ("loop", 16, ((0, (buffer_gpa(0), 16, NEXT, 1)), (1, (data_gpa(0), 512, NEXT | WRITE, 0))), (), (0,), 0),
        ("zero-length descriptor (CVE-2020-10725)", 16, ((0, (buffer_gpa(0), 16, NEXT, 1)),
         (1, (data_gpa(0), 0, WRITE | NEXT, 2)), (2, (buffer_gpa(0) + 0x800, 1, WRITE, 0))), (), (0,), 0),
        ("buffer not fully translated (CVE-2018-1059)", 16, ((0, (buffer_gpa(0), 16, NEXT, 1)),
         (1, (SIZE - 512, 1024, WRITE, 0))), (), (0,), 0),
        ("address wraps 2^64", 16, ((0, (buffer_gpa(0), 16, NEXT, 1)), (1, ((1 << 64) - 256, 512, WRITE, 0))), (),
         (0,), 0),
        ("chain of 4 GiB", 256, tuple((i, (0, REGION_SIZE * 2, NEXT, i + 1)) for i in range(255))
         + ((255, (0, SIZE, WRITE, 0)),), (), (0,), 0),
        ("avail index jump", 16, (), (), (0,), 17),
        ("writable before readable", 16, ((0, (buffer_gpa(0) + 0x800, 1, WRITE | NEXT, 1)),
         (1, (buffer_gpa(0), 16, 0, 0))), (), (0,), 0),
        ("header over many descriptors (CVE-2022-2132)", 32, tuple((i, (buffer_gpa(0) + i, 1, NEXT, i + 1))
         for i in range(16)) + ((16, (buffer_gpa(0) + 0x800, 1, WRITE, 0)),), (), (0,), 0),
        ("indirect len % 16", 16, ((0, (table_gpa(0), 24, INDIRECT, 0)),),
         ((0, ((buffer_gpa(0), 16, NEXT, 1), (buffer_gpa(0) + 0x800, 1, WRITE, 0))),), (0,), 0),
        ("nested indirect", 16, ((0, (table_gpa(0), 16, INDIRECT, 0)),), ((0, ((table_gpa(1), 32, INDIRECT, 0),)),),
         (0,), 0),
        ("indirect table across regions", 16, ((0, (REGION_SIZE - 16, 32, INDIRECT, 0)),), (), (0,), 0),
        ("dirty log overflow shape (CVE-2019-14835)", 16, ((0, (buffer_gpa(0), 16, NEXT, 1)),
         (1, (SIZE - 4096, 0xFFFFF000, WRITE, 0))), (), (0,), 0),
    ]
}
