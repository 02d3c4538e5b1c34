"""Device side of a split virtqueue, with every check the guest's input needs.

A ring runs once it has memory, addresses, a kick (fd or NOFD) and is enabled. Requests are
popped, handed to a handler as Buffers, and completed in batches: used elements are written as
each request finishes, used->idx is published once per batch, and the guest is called at most
once per batch (EVENT_IDX or NO_INTERRUPT permitting). Anything malformed raises DeviceBroken.
A handler may hold a request (event queues): the ring keeps its chain until complete_held; a
ring that stops or loses its memory hands held chains back by rewinding last_avail over them.
"""

from __future__ import annotations

import collections
import os
import struct
import threading
from dataclasses import dataclass
from typing import Callable

from lab.vhost_user import DeviceBroken
from lab.vhost_user.device import Buffers
from lab.vhost_user.dirty_log import DirtyLog
from lab.vhost_user.inflight import InflightQueue
from lab.vhost_user.memory import GuestMemory
from lab.vhost_user.protocol import VRING_F_LOG, VringAddr

DESC = struct.Struct("<QIHH")
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
MAX_CHAIN_BYTES = 1 << 32

_fence = threading.Lock()


def full_barrier() -> None:
    """A locked instruction orders our ring store before the following load (x86 may otherwise
    let the load pass the store and we would miss the guest's update)."""
    _fence.acquire()
    _fence.release()


def vring_need_event(event: int, new: int, old: int) -> bool:
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


@dataclass
class Chain:
    head: int
    buffers: Buffers
    #: guest-physical (address, length) of each device-writable descriptor, in chain order
    written: list[tuple[int, int]]


class VirtQueue:
    def __init__(self, index: int) -> None:
        self.index = index
        self.kick_fd = -1
        self.call_fd = -1
        self.err_fd = -1
        # QEMU 7.2 may enable a ring before its SET_VRING_CALL arrives; a completion in that gap
        # must still interrupt the guest (Linux's virtio_scsi never times a command out).
        self.call_missed = False
        # A ring is only looked at with a reason: a kick, an enable, or work done moments ago
        # (brief polling). One nobody kicked may sit in memory the guest reused: firmware leaves
        # its rings running when the OS takes over, and reading them would break the device.
        self.kicked = False
        self.busy_until = 0.0
        self._reset_state()

    def _reset_state(self) -> None:
        self.num = 0
        self.addr: VringAddr | None = None
        self.last_avail = 0
        self.used_idx = 0
        self.enabled = False
        self.started = False
        self.event_idx = False
        self.indirect = False
        self.log: DirtyLog | None = None
        self.log_buffers = True
        self.inflight: InflightQueue | None = None
        self.resubmit: collections.deque[int] = collections.deque()
        self.held: collections.deque[Chain] = collections.deque()
        self._memory: GuestMemory | None = None
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        self._used_hdr: memoryview | None = None
        self._used_elems: memoryview | None = None
        self._avail_event: memoryview | None = None
        self._batch: list[int] = []

    # ---- configuration -------------------------------------------------------------------

    def set_file(self, kind: str, fd: int) -> None:
        """Replace the kick, call or err eventfd (-1: none); the ring owns it from now on."""
        attr = f"{kind}_fd"
        old = getattr(self, attr)
        if old >= 0:
            os.close(old)
        setattr(self, attr, fd)
        if kind == "call" and fd >= 0 and self.call_missed:
            self.call_missed = False
            os.eventfd_write(fd, 1)

    def set_num(self, num: int) -> None:
        self.detach()
        self.num = num

    def set_addr(self, addr: VringAddr, memory: GuestMemory | None) -> None:
        if not self.num:
            raise DeviceBroken(f"vring {self.index}: addresses set before its size")
        if memory is None:
            raise DeviceBroken(f"vring {self.index}: addresses set before the memory table")
        self.addr = addr
        self.attach(memory)
        self.used_idx = self._used_hdr[1]

    def attach(self, memory: GuestMemory) -> None:
        """Map the ring structures; called on SET_VRING_ADDR and after a new memory table."""
        self.detach()
        addr, num = self.addr, self.num
        if addr is None:
            return
        if addr.desc % 16 or addr.avail % 2 or addr.used % 4:
            raise DeviceBroken(f"vring {self.index}: misaligned ring addresses")
        self._desc = memory.qva_view(addr.desc, 16 * num)
        self._avail = memory.qva_view(addr.avail, 6 + 2 * num).cast("H")
        used = memory.qva_view(addr.used, 6 + 8 * num)
        self._used = used
        self._used_hdr = used[0:4].cast("H")
        self._used_elems = used[4 : 4 + 8 * num].cast("I")
        self._avail_event = used[4 + 8 * num :].cast("H")
        self._memory = memory

    def detach(self) -> None:
        """Drop every view of guest memory (a memory table can only be unmapped without them)."""
        self._unhold()
        for name in ("_desc", "_avail", "_used_hdr", "_used_elems", "_avail_event", "_used"):
            view = getattr(self, name)
            if view is not None:
                view.release()
                setattr(self, name, None)
        self._memory = None

    def reset(self) -> None:
        """Back to the state of a fresh connection, fds closed."""
        self.detach()
        for kind in ("kick", "call", "err"):
            self.set_file(kind, -1)
        self._reset_state()

    @property
    def running(self) -> bool:
        return self.started and self.enabled and self._desc is not None

    def start(self, skip_inflight: bool = False) -> int:
        """The kick arrived: the ring may run. Recovers inflight requests; returns how many."""
        self.started = True
        if self.inflight is None or self._desc is None:
            return 0
        num, used_idx = self.num, self._used_hdr[1]
        lag = (used_idx - self.inflight.header_used_idx) & 0xFFFF
        ids = [self._used_elems[2 * ((used_idx - lag + k) & (num - 1))] for k in range(lag)] if lag <= num else []
        heads = self.inflight.recover(num, used_idx, ids)
        self.used_idx = used_idx
        self.last_avail = (used_idx + len(heads)) & 0xFFFF
        if not skip_inflight:
            self.resubmit = collections.deque(heads)
        return len(heads)

    def stop(self) -> int:
        """GET_VRING_BASE: requests are completed synchronously and held ones are handed back, so
        after the final flush nothing of this ring is in flight; from here on the ring's memory
        is not touched."""
        if self.running:
            self.flush()
        self._unhold()
        self.started = False
        self.set_file("kick", -1)
        return self.last_avail

    # ---- data path -----------------------------------------------------------------------

    def has_work(self) -> bool:
        return self.running and (bool(self.resubmit) or self._avail[1] != self.last_avail)

    def process(self, handler: Callable[[Buffers], int | None], budget: int) -> int:
        """Handle up to `budget` requests, then publish them; returns how many were handled."""
        done = 0
        while done < budget:
            chain = self._pop()
            if chain is None:
                break
            used = handler(chain.buffers)
            if used is None:
                self.held.append(chain)
            else:
                self._push(chain, used)
            done += 1
        self.flush()
        return done

    def complete_held(self, fill: Callable[[Buffers], int]) -> bool:
        """Fill and complete the oldest held chain; False if there is none or the ring is idle."""
        if not self.running or not self.held:
            return False
        chain = self.held.popleft()
        self._push(chain, fill(chain.buffers))
        self.flush()
        return True

    def _unhold(self) -> None:
        """Held chains are the last ones popped: rewinding makes them available again."""
        if self.held:
            self.last_avail = (self.last_avail - len(self.held)) & 0xFFFF
            self.held.clear()

    def _pop(self) -> Chain | None:
        if self.resubmit:
            return self._map_chain(self.resubmit.popleft())
        avail, num = self._avail, self.num
        pending = (avail[1] - self.last_avail) & 0xFFFF
        if not pending and self.event_idx:
            # Ask for a kick at the next request, then look again: the guest may have added
            # one between our check and the store.
            self._avail_event[0] = self.last_avail
            self._log_used(4 + 8 * num, 2)
            full_barrier()
            pending = (avail[1] - self.last_avail) & 0xFFFF
        if not pending:
            return None
        if pending > num:
            raise DeviceBroken(
                f"vring {self.index}: avail idx {avail[1]} is {pending} ahead of {self.last_avail} "
                f"(queue size {num})"
            )
        head = avail[2 + (self.last_avail & (num - 1))]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        chain = self._map_chain(head)
        if self.inflight is not None:
            self.inflight.popped(head)
        return chain

    def _map_chain(self, head: int) -> Chain:
        index, memory = self.index, self._memory
        table, size = self._desc, self.num
        if head >= size:
            raise DeviceBroken(f"vring {index}: head {head} >= queue size {size}")
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        written: list[tuple[int, int]] = []
        i, count, total, indirect = head, 0, 0, False
        while True:
            addr, length, flags, nxt = DESC.unpack_from(table, 16 * i)
            if flags & DESC_F_INDIRECT:
                if not self.indirect:
                    raise DeviceBroken(f"vring {index}: indirect descriptor without INDIRECT_DESC")
                if indirect:
                    raise DeviceBroken(f"vring {index}: nested indirect descriptor in chain {head}")
                if count:
                    raise DeviceBroken(f"vring {index}: indirect descriptor inside chain {head}")
                if flags & DESC_F_NEXT:
                    raise DeviceBroken(f"vring {index}: indirect descriptor with NEXT in chain {head}")
                if length == 0 or length % 16 or length // 16 > self.num:
                    raise DeviceBroken(
                        f"vring {index}: indirect table of {length} bytes (must be 16..{16 * self.num}, "
                        "a multiple of 16)"
                    )
                table, size, i, indirect = memory.contiguous(addr, length), length // 16, 0, True
                continue
            count += 1
            if count > size:
                raise DeviceBroken(f"vring {index}: chain {head} is longer than its table of {size} (loop)")
            if length == 0:
                raise DeviceBroken(f"vring {index}: zero-length descriptor in chain {head}")
            total += length
            if total >= MAX_CHAIN_BYTES:
                raise DeviceBroken(f"vring {index}: chain {head} totals 2^32 bytes or more")
            views = memory.views(addr, length)
            if flags & DESC_F_WRITE:
                writable.extend(views)
                written.append((addr, length))
            elif writable:
                raise DeviceBroken(f"vring {index}: readable descriptor after a writable one in chain {head}")
            else:
                readable.extend(views)
            if not flags & DESC_F_NEXT:
                break
            if nxt >= size:
                raise DeviceBroken(f"vring {index}: next {nxt} >= table size {size} in chain {head}")
            i = nxt
        return Chain(head, Buffers(readable, writable), written)

    def _push(self, chain: Chain, used_len: int) -> None:
        slot = self.used_idx & (self.num - 1)
        self._used_elems[2 * slot] = chain.head
        self._used_elems[2 * slot + 1] = used_len
        if self.log is not None:
            if self.log_buffers:
                remaining = used_len
                for gpa, length in chain.written:
                    if not remaining:
                        break
                    n = min(length, remaining)
                    self.log.mark(gpa, n)
                    remaining -= n
            self._log_used(4 + 8 * slot, 8)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._batch.append(chain.head)

    def _log_used(self, offset: int, length: int) -> None:
        if self.log is not None and self.addr.flags & VRING_F_LOG:
            self.log.mark(self.addr.log + offset, length)

    def flush(self) -> None:
        """Publish the batch's used elements, then call the guest if it wants to be called."""
        batch = self._batch
        if not batch:
            return
        if self.inflight is not None:
            self.inflight.batch_written(batch[-1])
        new, old = self.used_idx, (self.used_idx - len(batch)) & 0xFFFF
        self._used_hdr[1] = new
        self._log_used(2, 2)
        if self.inflight is not None:
            self.inflight.batch_published(batch, new)
        self._batch = []
        full_barrier()
        if self.event_idx:
            call = vring_need_event(self._avail[2 + self.num], new, old)
        else:
            call = not self._avail[0] & AVAIL_F_NO_INTERRUPT
        if call:
            if self.call_fd >= 0:
                os.eventfd_write(self.call_fd, 1)
            else:
                self.call_missed = True
