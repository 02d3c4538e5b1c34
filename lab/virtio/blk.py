"""virtio-blk requests on a VirtioDevice (virtio 1.x, 5.2).

BlkDevice offers synchronous requests (read/write with scatter lists, flush, get_id, discard,
write_zeroes) for tests and tools; IoSlots and random_io are the lean batch path (fixed queue
depth, preallocated buffers) that benchmarks drive back ends with.
"""

from __future__ import annotations

import random
import struct
import time
from dataclasses import dataclass
from typing import Callable, Sequence, Union

from . import DeviceTimeout, VirtioError
from .device import VirtioDevice, bit
from .transport import F_EVENT_IDX, F_INDIRECT_DESC, DmaBuffer, Transport

SECTOR = 512
ID_BYTES = 20
CONFIG_SIZE = 60

# request types
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13

# status byte
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

# feature bits
F_SIZE_MAX = 1
F_SEG_MAX = 2
F_GEOMETRY = 4
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_TOPOLOGY = 10
F_CONFIG_WCE = 11
F_MQ = 12
F_DISCARD = 13
F_WRITE_ZEROES = 14

DRIVER_FEATURES = sum(
    bit(b)
    for b in (
        F_SIZE_MAX, F_SEG_MAX, F_GEOMETRY, F_RO, F_BLK_SIZE, F_FLUSH, F_TOPOLOGY, F_CONFIG_WCE,
        F_MQ, F_DISCARD, F_WRITE_ZEROES, F_INDIRECT_DESC, F_EVENT_IDX,
    )
)

_HEADER = struct.Struct("<IIQ")
_RANGE = struct.Struct("<QII")
_CONFIG = struct.Struct("<QIIHBBIBBHIBxHIIIIIB3x")
assert _CONFIG.size == CONFIG_SIZE

# layout of each queue's scratch page for synchronous requests
_STATUS_OFF = 16
_ID_OFF = 64
_RANGES_OFF = 128
_SCRATCH = 4096
MAX_RANGES = (_SCRATCH - _RANGES_OFF) // _RANGE.size
_UNSET_STATUS = 0xFF  # the device must overwrite it; left alone means no status was written

Segment = Union[DmaBuffer, tuple[int, int]]  # a DMA buffer or (device address, length)


class BlkError(VirtioError):
    """The device completed a request with a non-OK status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class BlkIOError(BlkError):
    pass


class BlkUnsupported(BlkError):
    pass


def status_error(status: int, what: str) -> BlkError:
    if status == S_IOERR:
        return BlkIOError(f"{what}: device reported IOERR", status)
    if status == S_UNSUPP:
        return BlkUnsupported(f"{what}: device reported UNSUPP", status)
    return BlkError(f"{what}: device returned status {status:#x}", status)


@dataclass(frozen=True)
class BlkConfig:
    capacity: int  # in 512-byte sectors
    size_max: int
    seg_max: int
    cylinders: int
    heads: int
    sectors: int
    blk_size: int
    physical_block_exp: int
    alignment_offset: int
    min_io_size: int
    opt_io_size: int
    writeback: int
    num_queues: int
    max_discard_sectors: int
    max_discard_seg: int
    discard_sector_alignment: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    write_zeroes_may_unmap: int

    @classmethod
    def parse(cls, data: bytes) -> BlkConfig:
        return cls(*_CONFIG.unpack(data[:CONFIG_SIZE]))


def _segments(items: Sequence[Segment]) -> list[tuple[int, int]]:
    return [(s.addr, s.size) if isinstance(s, DmaBuffer) else (int(s[0]), int(s[1])) for s in items]


class BlkDevice:
    """A negotiated, running virtio-blk device with `num_queues` request queues."""

    def __init__(
        self,
        transport: Transport,
        *,
        num_queues: int = 1,
        queue_size: int = 128,
        without: int = 0,
        indirect_max: int = 64,
        timeout: float = 10.0,
    ) -> None:
        self.transport = transport
        self.timeout = timeout
        self.device = VirtioDevice(transport)
        try:
            self.features = self.device.negotiate(DRIVER_FEATURES & ~without)
            self.config = BlkConfig.parse(self.device.read_config(0, CONFIG_SIZE))
            available = self.config.num_queues if self.has(F_MQ) else 1
            if not 1 <= num_queues <= available:
                raise VirtioError(f"{num_queues} queues requested, the device offers {available}")
            self.queues = self.device.setup_queues(num_queues, queue_size, indirect_max)
            self._scratch = [self.device.alloc_dma(_SCRATCH) for _ in self.queues]
            self.device.driver_ok()
        except BaseException:
            self.device.reset()
            raise
        self.indirect_max = indirect_max if self.has(F_INDIRECT_DESC) else 0
        # data buffers per request: two descriptors go to the header and the status byte
        ring_limit = max(self.indirect_max, self.queues[0].size) - 2
        self.max_segments = min(self.config.seg_max, ring_limit) if self.has(F_SEG_MAX) else ring_limit
        # QEMU's storage daemon offers SIZE_MAX with size_max 0: read that as "no limit"
        size_max = self.config.size_max if self.has(F_SIZE_MAX) else 0
        self.max_segment_bytes = size_max if size_max >= SECTOR else 1 << 31

    def has(self, feature_bit: int) -> bool:
        return self.device.has(feature_bit)

    @property
    def capacity(self) -> int:
        """Size in 512-byte sectors."""
        return self.config.capacity

    @property
    def read_only(self) -> bool:
        return self.has(F_RO)

    # ---- synchronous requests -------------------------------------------------------------

    def read(self, sector: int, count: int, queue: int = 0) -> bytes:
        """`count` sectors from `sector`, split into as many requests as the limits need."""
        buffer = self.transport.alloc_dma(count * SECTOR)
        try:
            self.readv(sector, [buffer], queue)
            return bytes(buffer.view)
        finally:
            self.transport.free_dma(buffer)

    def write(self, sector: int, data: bytes, queue: int = 0) -> None:
        buffer = self.transport.alloc_dma(len(data))
        try:
            buffer.view[:] = data
            self.writev(sector, [buffer], queue)
        finally:
            self.transport.free_dma(buffer)

    def readv(self, sector: int, segments: Sequence[Segment], queue: int = 0, indirect: bool = False) -> None:
        self._transfer(T_IN, sector, _segments(segments), queue, indirect)

    def writev(self, sector: int, segments: Sequence[Segment], queue: int = 0, indirect: bool = False) -> None:
        self._transfer(T_OUT, sector, _segments(segments), queue, indirect)

    def flush(self, queue: int = 0) -> None:
        self.execute(queue, T_FLUSH, 0, [], False)

    def get_id(self, queue: int = 0) -> str:
        scratch = self._scratch[queue]
        scratch.view[_ID_OFF : _ID_OFF + ID_BYTES] = bytes(ID_BYTES)
        self.execute(queue, T_GET_ID, 0, [(scratch.addr + _ID_OFF, ID_BYTES)], True)
        raw = bytes(scratch.view[_ID_OFF : _ID_OFF + ID_BYTES])
        return raw.split(b"\0", 1)[0].decode("ascii", "replace")

    def discard(self, ranges: Sequence[tuple[int, int]], queue: int = 0) -> None:
        """Discard (sector, num_sectors) ranges in one request."""
        self._ranges(T_DISCARD, ranges, 0, queue)

    def write_zeroes(self, ranges: Sequence[tuple[int, int]], unmap: bool = False, queue: int = 0) -> None:
        self._ranges(T_WRITE_ZEROES, ranges, 1 if unmap else 0, queue)

    def set_writeback(self, enabled: bool) -> None:
        """Switch the write cache mode (CONFIG_WCE): the one config byte a driver writes."""
        self.device.write_config(32, bytes([1 if enabled else 0]))

    def execute(
        self, queue: int, type_: int, sector: int, data: Sequence[tuple[int, int]], writable: bool,
        indirect: bool = False,
    ) -> int:
        """One request: header, data buffers (all readable or all writable), status. Used length."""
        scratch = self._scratch[queue]
        _HEADER.pack_into(scratch.view, 0, type_, 0, sector)
        scratch.view[_STATUS_OFF] = _UNSET_STATUS
        header, status_byte = (scratch.addr, _HEADER.size), (scratch.addr + _STATUS_OFF, 1)
        if writable:
            readable, written = [header], [*data, status_byte]
        else:
            readable, written = [header, *data], [status_byte]
        used = self.queues[queue].call(readable, written, self.timeout, indirect)
        status = scratch.view[_STATUS_OFF]
        if status != S_OK:
            raise status_error(status, f"request type {type_} at sector {sector}")
        return used

    def close(self) -> None:
        self.device.close()

    # ---- helpers --------------------------------------------------------------------------

    def _transfer(self, type_: int, sector: int, segments: list[tuple[int, int]], queue: int, indirect: bool) -> None:
        cut = self.max_segment_bytes - self.max_segment_bytes % SECTOR
        limit = min(self.max_segments, self.indirect_max - 2) if indirect else self.max_segments
        group: list[tuple[int, int]] = []
        group_bytes = 0
        for addr, length in segments:
            if length <= 0 or length % SECTOR:
                raise VirtioError(f"segment length {length} is not a positive multiple of {SECTOR}")
            while length:
                piece = min(length, cut)
                group.append((addr, piece))
                group_bytes += piece
                addr += piece
                length -= piece
                if len(group) == limit:
                    self.execute(queue, type_, sector, group, type_ == T_IN, indirect)
                    sector += group_bytes // SECTOR
                    group, group_bytes = [], 0
        if group:
            self.execute(queue, type_, sector, group, type_ == T_IN, indirect)

    def _ranges(self, type_: int, ranges: Sequence[tuple[int, int]], flags: int, queue: int) -> None:
        if not 0 < len(ranges) <= MAX_RANGES:
            raise VirtioError(f"{len(ranges)} ranges: one request carries 1..{MAX_RANGES}")
        scratch = self._scratch[queue]
        for i, (sector, count) in enumerate(ranges):
            _RANGE.pack_into(scratch.view, _RANGES_OFF + i * _RANGE.size, sector, count, flags)
        self.execute(queue, type_, 0, [(scratch.addr + _RANGES_OFF, len(ranges) * _RANGE.size)], False)


class IoSlots:
    """`depth` preallocated requests (header, one data buffer, status) on one queue.

    submit() only builds the request; kick() publishes everything built since the last kick.
    """

    def __init__(self, blk: BlkDevice, queue: int, depth: int, block_size: int, indirect: bool = False) -> None:
        self.blk = blk
        self.queue = blk.queues[queue]
        per_request = 1 if indirect else 3
        if depth * per_request > self.queue.size:
            raise VirtioError(f"queue depth {depth} needs {depth * per_request} descriptors, ring has {self.queue.size}")
        self.depth = depth
        self.block_size = block_size
        self.indirect = indirect
        self._memory = blk.transport.alloc_dma(depth * block_size + depth * 32)
        meta = depth * block_size
        self._meta = meta
        self._view = self._memory.view
        base = self._memory.addr
        self.buffers = [
            DmaBuffer(base + i * block_size, self._view[i * block_size : (i + 1) * block_size]) for i in range(depth)
        ]
        self._header_addr = [base + meta + 32 * i for i in range(depth)]

    def submit(self, slot: int, type_: int, sector: int) -> None:
        offset = self._meta + 32 * slot
        _HEADER.pack_into(self._view, offset, type_, 0, sector)
        self._view[offset + _STATUS_OFF] = _UNSET_STATUS
        q = self.queue
        header = self._header_addr[slot]
        q.start(slot, 3, self.indirect)
        q.add(header, 16, False)
        q.add(self.buffers[slot].addr, self.block_size, type_ == T_IN)
        q.add(header + _STATUS_OFF, 1, True)

    def kick(self) -> None:
        self.queue.flush()

    def reap(self, timeout: float) -> list[tuple[int, int]]:
        """Completed (slot, status byte) pairs."""
        view = self._view
        base = self._meta + _STATUS_OFF
        return [(slot, view[base + 32 * slot]) for slot, _ in self.queue.reap(timeout)]

    def close(self) -> None:
        self.blk.transport.free_dma(self._memory)


@dataclass(frozen=True)
class IoResult:
    ios: int
    errors: int
    seconds: float

    @property
    def iops(self) -> float:
        return self.ios / self.seconds if self.seconds else 0.0


def random_io(
    blk: BlkDevice,
    type_: int = T_IN,
    *,
    queues: Sequence[int] = (0,),
    depth: int = 32,
    block_size: int = 4096,
    ios: int = 10000,
    seed: int = 0,
    span_blocks: int | None = None,
    fill: Callable[[memoryview, int], None] | None = None,
) -> IoResult:
    """`ios` random block-aligned requests at queue depth `depth` on each queue, one thread.

    `fill(buffer, block)` prepares each write's data (e.g. workload stamps) before submission.
    """
    if block_size % SECTOR:
        raise VirtioError(f"block size {block_size} is not a multiple of {SECTOR}")
    blocks = span_blocks or blk.capacity * SECTOR // block_size
    per_block = block_size // SECTOR
    pick = random.Random(seed).randrange
    slots = [IoSlots(blk, q, depth, block_size) for q in queues]
    submitted = done = errors = 0

    def submit_random(s: IoSlots, slot: int) -> None:
        nonlocal submitted
        block = pick(blocks)
        if fill is not None:
            fill(s.buffers[slot].view, block)
        s.submit(slot, type_, block * per_block)
        submitted += 1

    try:
        start = time.perf_counter()
        for s in slots:
            for slot in range(min(depth, ios - submitted)):
                submit_random(s, slot)
            s.kick()
        wait = blk.timeout if len(slots) == 1 else 0.001  # never sleep on one queue while another has work
        last_progress = time.monotonic()
        while done < ios:
            for s in slots:
                completions = s.reap(wait)
                if not completions:
                    continue
                last_progress = time.monotonic()
                for slot, status in completions:
                    done += 1
                    errors += status != S_OK
                    if submitted < ios:
                        submit_random(s, slot)
                s.kick()
            if time.monotonic() - last_progress > blk.timeout:
                raise DeviceTimeout(f"random I/O stalled after {done} of {ios} completions")
        return IoResult(done, errors, time.perf_counter() - start)
    finally:
        for s in slots:
            s.close()
