"""The driver side of the split ring, with the test itself reading and answering as the device."""

from __future__ import annotations

import struct

import pytest

from lab.virtio import QueueFull, VirtioError
from lab.virtio.ring import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    USED_F_NO_NOTIFY,
    SplitQueue,
    ring_layout,
)
from lab.virtio.transport import DmaBuffer

BASE = 0x100000
IND_BASE = 0x800000


class Device:
    """Reads what the driver published and completes it, straight from ring memory."""

    def __init__(self, size: int, *, event_idx: bool = False, indirect_max: int = 0) -> None:
        avail, used, total = ring_layout(size)
        self.size = size
        self.mem = bytearray(total + 64)
        self.avail, self.used = avail, used
        self.kicks = 0
        self.last_avail = 0
        self.used_idx = 0
        self.table = bytearray(size * indirect_max * 16) if indirect_max else None
        self.queue = SplitQueue(
            0, size, DmaBuffer(BASE, memoryview(self.mem)), self._kick, lambda timeout: False,
            event_idx=event_idx,
            indirect=DmaBuffer(IND_BASE, memoryview(self.table)) if self.table is not None else None,
            indirect_max=indirect_max,
        )

    def _kick(self) -> None:
        self.kicks += 1

    def u16(self, offset: int) -> int:
        return struct.unpack_from("<H", self.mem, offset)[0]

    def desc(self, i: int, table: bytes | None = None) -> tuple[int, int, int, int]:
        if table is None:
            return struct.unpack_from("<QIHH", self.mem, 16 * i)
        return struct.unpack_from("<QIHH", table, 16 * i)

    def pop(self) -> list[tuple[int, list[tuple[int, int, int]]]]:
        """Every newly available chain: (head, [(addr, len, flags)...])."""
        out = []
        while self.last_avail != self.u16(self.avail + 2):
            head = self.u16(self.avail + 4 + 2 * (self.last_avail % self.size))
            self.last_avail = (self.last_avail + 1) & 0xFFFF
            chain, i, table = [], head, None
            while True:
                addr, length, flags, nxt = self.desc(i, table)
                if flags & DESC_F_INDIRECT:
                    offset = addr - IND_BASE
                    table, i = bytes(self.table[offset : offset + length]), 0
                    continue
                chain.append((addr, length, flags & ~DESC_F_NEXT))
                if not flags & DESC_F_NEXT:
                    break
                i = nxt
            out.append((head, chain))
        return out

    def push(self, head: int, length: int) -> None:
        slot = self.used_idx % self.size
        struct.pack_into("<II", self.mem, self.used + 4 + 8 * slot, head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, self.used + 2, self.used_idx)

    def set_avail_event(self, value: int) -> None:
        struct.pack_into("<H", self.mem, self.used + 4 + 8 * self.size, value)


def submit(q: SplitQueue, cookie: object, bufs: list[tuple[int, int, bool]], indirect: bool = False) -> None:
    q.start(cookie, len(bufs), indirect)
    for addr, length, writable in bufs:
        q.add(addr, length, writable)


def test_chain_layout_and_completion():
    dev = Device(8)
    q = dev.queue
    submit(q, "a", [(0x1000, 16, False), (0x2000, 4096, True), (0x3000, 1, True)])
    submit(q, "b", [(0x4000, 512, False)])
    q.flush()
    assert dev.kicks == 1  # one kick for the whole batch
    chains = dev.pop()
    assert [c for _, c in chains] == [
        [(0x1000, 16, 0), (0x2000, 4096, DESC_F_WRITE), (0x3000, 1, DESC_F_WRITE)],
        [(0x4000, 512, 0)],
    ]
    assert q.num_free == 4
    dev.push(chains[1][0], 0)
    dev.push(chains[0][0], 4097)
    assert q.poll() == [("b", 0), ("a", 4097)]
    assert q.num_free == 8 and q.poll() == []


def test_free_list_survives_many_wraps():
    dev = Device(4)
    q = dev.queue
    for n in range(70000):  # past the 16-bit index wrap
        submit(q, n, [(n * 64, 64, bool(n & 1))] * (1 + n % 3))
        q.flush()
        (head, chain), = dev.pop()
        assert len(chain) == 1 + n % 3
        dev.push(head, n & 0xFF)
        assert q.poll() == [(n, n & 0xFF)]
    assert q.num_free == 4


def test_queue_full_and_abort():
    dev = Device(4)
    q = dev.queue
    submit(q, 1, [(0, 1, False)] * 3)
    with pytest.raises(QueueFull):
        q.start(2, 2)
    q.start(3, 1)
    q.add(0x10, 1)
    q.abort()
    q.flush()
    assert len(dev.pop()) == 1 and q.num_free == 1
    with pytest.raises(VirtioError, match="never fit"):
        q.start(4, 5)


def test_more_buffers_than_reserved_and_empty_request():
    q = Device(8).queue
    q.start(1, 1)
    q.add(0, 1)
    with pytest.raises(VirtioError, match="reserved"):
        q.add(0, 1)
    q.abort()
    q.start(2, 1)
    with pytest.raises(VirtioError, match="without buffers"):
        q.flush()


def test_indirect_request_uses_one_ring_descriptor():
    dev = Device(4, indirect_max=8)
    q = dev.queue
    bufs = [(0x1000 * i, 512, i == 5) for i in range(6)]
    submit(q, "ind", bufs, indirect=True)
    q.flush()
    assert q.num_free == 3
    (head, chain), = dev.pop()
    assert chain == [(a, n, DESC_F_WRITE if w else 0) for a, n, w in bufs]
    addr, length, flags, _ = dev.desc(head)
    assert flags == DESC_F_INDIRECT and length == 16 * 6 and addr == IND_BASE + head * 8 * 16
    dev.push(head, 512)
    assert q.poll() == [("ind", 512)] and q.num_free == 4
    with pytest.raises(VirtioError, match="indirect"):
        q.start("big", 9, indirect=True)


def test_indirect_needs_negotiation():
    with pytest.raises(VirtioError, match="INDIRECT_DESC"):
        Device(4).queue.start(1, 2, indirect=True)


def test_no_notify_flag_suppresses_kicks():
    dev = Device(8)
    q = dev.queue
    struct.pack_into("<H", dev.mem, dev.used, USED_F_NO_NOTIFY)
    submit(q, 1, [(0, 1, False)])
    q.flush()
    assert dev.kicks == 0
    struct.pack_into("<H", dev.mem, dev.used, 0)
    submit(q, 2, [(0, 1, False)])
    q.flush()
    assert dev.kicks == 1


def test_event_idx_kicks_only_when_avail_event_is_crossed():
    dev = Device(16, event_idx=True)
    q = dev.queue
    dev.set_avail_event(0)  # device wants a kick when entry 0 is published
    submit(q, 0, [(0, 1, False)])
    q.flush()
    assert dev.kicks == 1
    dev.set_avail_event(5)  # next kick only once idx passes 5
    for n in range(1, 5):
        submit(q, n, [(0, 1, False)])
        q.flush()
    assert dev.kicks == 1
    submit(q, 5, [(0, 1, False)])
    submit(q, 6, [(0, 1, False)])
    q.flush()  # old=5, new=7 crosses event 5
    assert dev.kicks == 2


def test_interrupt_suppression_fields():
    dev = Device(8)
    q = dev.queue
    avail_flags = lambda: dev.u16(dev.avail)  # noqa: E731
    assert avail_flags() == AVAIL_F_NO_INTERRUPT  # polling mode by default
    q.enable_interrupts()
    assert avail_flags() == 0
    q.disable_interrupts()
    assert avail_flags() == AVAIL_F_NO_INTERRUPT

    dev = Device(8, event_idx=True)
    q = dev.queue
    used_event = lambda: dev.u16(dev.avail + 4 + 2 * 8)  # noqa: E731
    assert used_event() == 0xFFFF  # one behind last_used: never crossed
    submit(q, 1, [(0, 1, False)])
    q.flush()
    (head, _), = dev.pop()
    dev.push(head, 1)
    q.enable_interrupts()
    assert used_event() == 0
    assert q.poll() == [(1, 1)]
    assert used_event() == 1  # keeps asking for the next completion
    q.disable_interrupts()
    assert used_event() == 0


def test_device_errors_are_detected():
    dev = Device(8)
    q = dev.queue
    dev.push(3, 0)  # never made available
    with pytest.raises(VirtioError, match="not in flight"):
        q.poll()
    dev = Device(8)
    struct.pack_into("<H", dev.mem, dev.used + 2, 9)
    with pytest.raises(VirtioError, match="queue size"):
        dev.queue.poll()


def test_raw_access_for_malformed_rings():
    dev = Device(8)
    q = dev.queue
    q.write_descriptor(2, 0xdead000, 77, DESC_F_NEXT, 2)  # a loop
    q.publish_head(2)
    assert q.avail_idx == 1 and dev.u16(dev.avail + 4) == 2
    assert dev.desc(2) == (0xdead000, 77, DESC_F_NEXT, 2)
    q.set_avail_idx(0x1234)
    assert dev.u16(dev.avail + 2) == 0x1234
    q.kick()
    assert dev.kicks == 1
    dev.push(7, 9)
    assert q.used_idx == 1 and q.used_entry(0) == (7, 9)


@pytest.mark.parametrize("size", [0, 3, 65536])
def test_bad_queue_sizes(size):
    with pytest.raises(VirtioError):
        SplitQueue(0, size, DmaBuffer(0, memoryview(bytearray(1 << 20))), lambda: None, lambda t: False)
