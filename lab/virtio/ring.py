"""Driver side of the split virtqueue (virtio 1.x, 2.7).

Layout in one DMA block: descriptor table (16*N, align 16), avail ring (6+2*N), used ring
(6+8*N, placed on its own 64-byte line). Free descriptors form a list chained through their
`next` fields, so taking descriptors for a request never rewrites links: a request's chain is
simply the front of the free list. A request is start() / add()... / [start() ...] flush().

Fields are read and written through memoryview casts of the shared memory ('H', 'I') and one
precompiled struct for whole descriptors; the hot path allocates nothing but the result tuples.
Virtio is little-endian; so is every host this lab runs on (checked at import).
"""

from __future__ import annotations

import struct
import sys
import threading
import time
from typing import Any, Callable, Sequence

from . import DeviceTimeout, QueueFull, VirtioError
from .transport import DmaBuffer

if sys.byteorder != "little":  # the casts below read ring fields in native order
    raise ImportError("lab.virtio needs a little-endian host")

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 32768

_DESC = struct.Struct("<QIHH")
_FREE = object()  # cookie slot of a head that is not in flight

_barrier_lock = threading.Lock()


def full_barrier() -> None:
    """Order our earlier stores before our later loads, as seen by the device's CPU.

    x86 may let a load pass an older store (store buffer), which would let us read a stale
    avail_event / NO_NOTIFY after publishing avail.idx and skip a kick the device waits for.
    CPython's Lock is a semaphore whose acquire/release are locked (fully ordering) instructions.
    """
    _barrier_lock.acquire()
    _barrier_lock.release()


def align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def ring_layout(size: int) -> tuple[int, int, int]:
    """Byte offsets (avail, used) and total size of a split ring of `size` entries."""
    avail = 16 * size
    used = align_up(avail + 6 + 2 * size, 64)
    return avail, used, used + 6 + 8 * size


class SplitQueue:
    """One virtqueue as the driver sees it. Not thread-safe: one thread per queue."""

    def __init__(
        self,
        index: int,
        size: int,
        ring: DmaBuffer,
        notify: Callable[[], None],
        wait: Callable[[float], bool],
        *,
        event_idx: bool = False,
        indirect: DmaBuffer | None = None,
        indirect_max: int = 0,
    ) -> None:
        if size <= 0 or size & (size - 1) or size > MAX_QUEUE_SIZE:
            raise VirtioError(f"queue {index}: size {size} is not a power of two <= {MAX_QUEUE_SIZE}")
        avail_off, used_off, total = ring_layout(size)
        if ring.size < total:
            raise VirtioError(f"queue {index}: ring memory {ring.size} B < {total} B needed")
        if indirect is not None and indirect.size < size * indirect_max * 16:
            raise VirtioError(f"queue {index}: indirect table memory too small")
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self.ring = ring
        self.desc_addr = ring.addr
        self.avail_addr = ring.addr + avail_off
        self.used_addr = ring.addr + used_off
        self.kicks = 0
        self._notify = notify
        self._wait = wait
        self._mask = size - 1

        mem = ring.view
        mem[:total] = bytes(total)
        self._desc = mem[: 16 * size]
        self._desc_h = self._desc.cast("H")
        # avail: [flags, idx, ring[size], used_event]
        self._avail_h = mem[avail_off : avail_off + 6 + 2 * size].cast("H")
        # used: [flags, idx, ...]; elements {u32 id, u32 len} from +4; avail_event after them
        self._used_h = mem[used_off : used_off + 6 + 8 * size].cast("H")
        self._used_elems = mem[used_off + 4 : used_off + 4 + 8 * size].cast("I")
        self._used_event = 2 + size
        self._avail_event = 2 + 4 * size

        self._next = [(i + 1) & self._mask for i in range(size)]
        for i in range(size):
            _DESC.pack_into(self._desc, 16 * i, 0, 0, 0, self._next[i])
        self._free_head = 0
        self._num_free = size
        self._cookies: list[Any] = [_FREE] * size
        self._chain_len = [0] * size
        self._chain_tail = [0] * size

        self._indirect = indirect
        self._indirect_max = indirect_max if indirect is not None else 0
        self._ind_stride = 16 * self._indirect_max

        self._avail_shadow = 0  # avail.idx including requests not yet flushed
        self._avail_published = 0
        self._last_used = 0
        self._interrupts = True
        self.disable_interrupts()

        # the request being built: head index, buffers added, buffers reserved, last descriptor
        self._head = -1
        self._count = 0
        self._reserved = 0
        self._tail = 0
        self._open_indirect = False

    # ---- building requests -------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def in_flight(self) -> int:
        return self.size - self._num_free

    def start(self, cookie: Any, nbufs: int, indirect: bool = False) -> None:
        """Open a request of up to `nbufs` buffers; `cookie` comes back from poll()."""
        if self._head >= 0:
            self._close_request()
        if nbufs <= 0:
            raise VirtioError(f"queue {self.index}: a request needs at least one buffer")
        if indirect:
            if nbufs > self._indirect_max:
                raise VirtioError(
                    f"queue {self.index}: {nbufs} buffers exceed the indirect table "
                    f"({self._indirect_max}; 0 = INDIRECT_DESC not negotiated)"
                )
            need = 1
        else:
            need = nbufs
        if need > self._num_free:
            if need > self.size:
                raise VirtioError(f"queue {self.index}: {need} buffers never fit a ring of {self.size}")
            raise QueueFull(f"queue {self.index}: {need} descriptors wanted, {self._num_free} free")
        head = self._free_head
        self._head = head
        self._count = 0
        self._reserved = nbufs
        self._open_indirect = indirect
        self._cookies[head] = cookie

    def add(self, addr: int, length: int, writable: bool = False) -> None:
        """Append one buffer (device-readable, or device-writable) to the open request."""
        count = self._count
        if count >= self._reserved:
            raise VirtioError(f"queue {self.index}: more buffers than the {self._reserved} reserved")
        flags = DESC_F_WRITE | DESC_F_NEXT if writable else DESC_F_NEXT
        if self._open_indirect:
            _DESC.pack_into(
                self._indirect.view, self._head * self._ind_stride + 16 * count, addr, length, flags, count + 1
            )
        else:
            i = self._free_head if count == 0 else self._next[self._tail]
            _DESC.pack_into(self._desc, 16 * i, addr, length, flags, self._next[i])
            self._tail = i
        self._count = count + 1

    def abort(self) -> None:
        """Drop the open request; its descriptors stay on the free list."""
        if self._head >= 0:
            self._cookies[self._head] = _FREE
            self._head = -1

    def _close_request(self) -> None:
        head = self._head
        count = self._count
        self._head = -1
        if count == 0:
            self._cookies[head] = _FREE
            raise VirtioError(f"queue {self.index}: request started without buffers")
        if self._open_indirect:
            table = self._indirect.view
            last = head * self._ind_stride + 16 * (count - 1)
            struct.pack_into("<H", table, last + 12, struct.unpack_from("<H", table, last + 12)[0] & ~DESC_F_NEXT)
            _DESC.pack_into(
                self._desc, 16 * head, self._indirect.addr + head * self._ind_stride,
                16 * count, DESC_F_INDIRECT, self._next[head],
            )
            tail = head
            count = 1
        else:
            tail = self._tail
            self._desc_h[8 * tail + 6] &= ~DESC_F_NEXT
        self._free_head = self._next[tail]
        self._num_free -= count
        self._chain_len[head] = count
        self._chain_tail[head] = tail
        self._avail_h[2 + (self._avail_shadow & self._mask)] = head
        self._avail_shadow = (self._avail_shadow + 1) & 0xFFFF

    def flush(self) -> None:
        """Publish every request built since the last flush and kick unless the device declines."""
        if self._head >= 0:
            self._close_request()
        new = self._avail_shadow
        old = self._avail_published
        if new == old:
            return
        # Descriptors and ring entries were stored before the index: x86 keeps store order and
        # CPython does not reorder memoryview stores.
        self._avail_h[1] = new
        self._avail_published = new
        full_barrier()
        if self.event_idx:
            event = self._used_h[self._avail_event]
            kick = ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        else:
            kick = not self._used_h[0] & USED_F_NO_NOTIFY
        if kick:
            self.kicks += 1
            self._notify()

    # ---- completions -------------------------------------------------------------------

    def poll(self) -> list[tuple[Any, int]]:
        """Every completed request since the last poll as (cookie, used length)."""
        used_idx = self._used_h[1]
        last = self._last_used
        n = (used_idx - last) & 0xFFFF
        if not n:
            return []
        if n > self.size:
            raise VirtioError(f"queue {self.index}: device moved used.idx by {n} > queue size {self.size}")
        elems = self._used_elems
        cookies = self._cookies
        mask = self._mask
        out = []
        for _ in range(n):
            slot = (last & mask) << 1
            head = elems[slot]
            if head >= self.size or cookies[head] is _FREE:
                raise VirtioError(f"queue {self.index}: device returned head {head}, which is not in flight")
            out.append((cookies[head], elems[slot + 1]))
            cookies[head] = _FREE
            tail = self._chain_tail[head]
            self._next[tail] = self._free_head
            self._free_head = head
            self._num_free += self._chain_len[head]
            last = (last + 1) & 0xFFFF
        self._last_used = last
        if self.event_idx:
            self._avail_h[self._used_event] = last if self._interrupts else (last - 1) & 0xFFFF
        return out

    def enable_interrupts(self) -> None:
        """Ask for a call on the next completion (used_event, or clearing NO_INTERRUPT)."""
        self._interrupts = True
        if self.event_idx:
            self._avail_h[self._used_event] = self._last_used
        else:
            self._avail_h[0] = 0

    def disable_interrupts(self) -> None:
        """Polling mode. With EVENT_IDX, used_event one behind what we consumed is never crossed."""
        self._interrupts = False
        if self.event_idx:
            self._avail_h[self._used_event] = (self._last_used - 1) & 0xFFFF
        else:
            self._avail_h[0] = AVAIL_F_NO_INTERRUPT

    def reap(self, timeout: float, spin: float = 50e-6) -> list[tuple[Any, int]]:
        """Completions, waiting up to `timeout` s: busy-poll for `spin` s, then sleep on calls."""
        done = self.poll()
        if done:
            return done
        now = time.monotonic()
        spin_end = now + spin
        while now < spin_end:
            done = self.poll()
            if done:
                return done
            now = time.monotonic()
        deadline = now + timeout
        while True:
            self.enable_interrupts()
            full_barrier()  # used_event/flags must be visible before we re-check and sleep
            done = self.poll()
            if not done:
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._wait(remaining)
                    done = self.poll()
            self.disable_interrupts()
            if done or time.monotonic() >= deadline:
                return done

    def call(
        self, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]], timeout: float,
        indirect: bool = False,
    ) -> int:
        """One request of (device address, length) buffers, readable ones first, published and
        waited for: its used length. For synchronous drivers with nothing else in flight here:
        completions of other requests that arrive meanwhile are dropped."""
        cookie = object()
        self.start(cookie, len(readable) + len(writable), indirect)
        for addr, length in readable:
            self.add(addr, length, False)
        for addr, length in writable:
            self.add(addr, length, True)
        self.flush()
        deadline = time.monotonic() + timeout
        while True:
            for done, used in self.reap(max(deadline - time.monotonic(), 0)):
                if done is cookie:
                    return used
            if time.monotonic() >= deadline:
                raise DeviceTimeout(f"queue {self.index}: no completion within {timeout}s")

    # ---- raw access for tests that hand the device malformed rings --------------------

    def write_descriptor(self, i: int, addr: int, length: int, flags: int, next_: int) -> None:
        _DESC.pack_into(self._desc, 16 * i, addr, length, flags, next_)

    def write_indirect(self, head: int, k: int, addr: int, length: int, flags: int, next_: int) -> DmaBuffer:
        """Write entry k of head's indirect table; returns the table (its addr for the ring desc)."""
        if self._indirect is None:
            raise VirtioError(f"queue {self.index}: no indirect tables (INDIRECT_DESC not negotiated)")
        base = head * self._ind_stride
        _DESC.pack_into(self._indirect.view, base + 16 * k, addr, length, flags, next_)
        return DmaBuffer(self._indirect.addr + base, self._indirect.view[base : base + self._ind_stride])

    def publish_head(self, head: int) -> None:
        """Put any value in the next avail slot and publish it (no bookkeeping, no kick)."""
        self._avail_h[2 + (self._avail_shadow & self._mask)] = head & 0xFFFF
        self.set_avail_idx(self._avail_shadow + 1)

    def set_avail_idx(self, value: int) -> None:
        self._avail_shadow = self._avail_published = value & 0xFFFF
        self._avail_h[1] = self._avail_shadow

    def kick(self) -> None:
        self.kicks += 1
        self._notify()

    @property
    def avail_idx(self) -> int:
        return self._avail_h[1]

    @property
    def used_idx(self) -> int:
        return self._used_h[1]

    @property
    def used_flags(self) -> int:
        return self._used_h[0]

    @property
    def avail_event(self) -> int:
        return self._used_h[self._avail_event]

    def used_entry(self, slot: int) -> tuple[int, int]:
        """The raw (id, len) in used ring slot `slot` (mod size)."""
        s = (slot & self._mask) << 1
        return self._used_elems[s], self._used_elems[s + 1]
