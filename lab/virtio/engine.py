"""Timed, verifiable block I/O at a fixed queue depth on several queues, polled from one thread.

A target (a virtio-blk device, or one LUN of a virtio-scsi host) turns a slot's request into a
descriptor chain from preallocated per-slot metadata; the engine owns the data buffers (hugepage
memory split where its physical ranges break), picks blocks, keeps every queue full, polls all
used rings in turn and measures each request. In randrw, reads land in buffers that only the
device writes and writes go out from buffers that only the CPU fills: what a read buffer holds
is the device's doing alone (after a live migration, only the back end's dirty log brought it
over to the destination). With `verify`, writes carry workload stamps of
(block, generation, seed) and reads check them against what this run wrote or, for blocks it has
not written, against `prior` (the generation the span held before; 0: zeros). The engine state
outlives a device reset, so a second pass on a re-initialised device checks the first pass's data.
A run can be watched and ended from outside: a tick callback sees the engine every TICK_SECONDS
(its counters so far) and says whether to go on; `until_stopped` runs until it says no.
Reports are plain dataclasses shared with the host side (lab.guest.driver), which parses the JSON.
"""

from __future__ import annotations

import dataclasses
import random
import struct
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from . import DeviceTimeout, VirtioError
from .blk import F_FLUSH, T_IN, T_OUT, BlkDevice
from .dma import DmaMemory, SgBuffer
from .ring import SplitQueue
from .scsi import CMD_REQ, FIRST_REQUEST_QUEUE, Disk, ScsiHost, encode_lun
from .workload import MIN_BLOCK, check_block, stamp_block

RW_MODES = ("read", "write", "randread", "randwrite", "randrw")
MAX_MISMATCHES = 10
STALL_SECONDS = 10.0
TICK_SECONDS = 0.25

_BLK_HEADER = struct.Struct("<IIQ")
_RW16 = struct.Struct(">BBQIBB")
_CDB_OFF = 19  # lun[8], tag u64, task_attr, prio, crn
_RESP_OFF = 64
_RESP_STATUS = _RESP_OFF + 10
_RESP_RESPONSE = _RESP_OFF + 11
_UNTOUCHED, _WRITTEN, _UNKNOWN = 0, 1, 2


@dataclass(frozen=True)
class IoSpec:
    rw: str = "randread"
    bs: int = 4096
    qd: int = 32
    queues: int = 1
    seconds: float | None = None  # stop submitting after this long ...
    ios: int | None = None  # ... or after this many requests per pass (whichever comes first)
    seed: int = 0
    verify: bool = False
    generation: int = 1  # stamp generation of this run's writes
    prior: int | None = None  # generation of blocks not written in this run (0: zeros; None: unchecked)
    first_block: int = 0  # the span, in units of bs
    blocks: int | None = None  # None: to the end of the device
    rwmix_read: int = 50  # percent of reads in randrw
    until_stopped: bool = False  # run until the tick callback says stop (and --seconds/--ios, if given)

    def check(self) -> None:
        if self.rw not in RW_MODES:
            raise VirtioError(f"--rw {self.rw}: one of {', '.join(RW_MODES)}")
        if self.bs <= 0 or self.bs % 512:
            raise VirtioError(f"--bs {self.bs}: a positive multiple of 512")
        if self.verify and self.bs < MIN_BLOCK:
            raise VirtioError(f"--verify needs --bs >= {MIN_BLOCK}")
        if self.qd < 1 or self.queues < 1:
            raise VirtioError("--qd and --queues must be at least 1")
        if self.seconds is None and self.ios is None and not self.until_stopped:
            raise VirtioError("give --seconds, --ios or --until-stopped")
        if self.generation < 1:
            raise VirtioError("--generation must be at least 1 (0 means zeros)")

    @property
    def mixed(self) -> bool:
        return self.rw == "randrw"

    def data_bytes(self) -> int:
        """DMA memory for the data buffers: qd per queue, twice over when reads and writes mix."""
        return (2 if self.mixed else 1) * self.queues * self.qd * self.bs


@dataclass(frozen=True)
class Latency:
    mean_us: float
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    max_us: float

    @classmethod
    def of(cls, samples: list[float]) -> Latency:
        if not samples:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        ordered = sorted(samples)
        n = len(ordered)

        def at(q: float) -> float:
            return round(ordered[min(int(q * n), n - 1)] * 1e6, 1)

        return cls(round(sum(ordered) / n * 1e6, 1), at(0.5), at(0.9), at(0.99), at(0.999), round(ordered[-1] * 1e6, 1))


@dataclass(frozen=True)
class IoReport:
    device: str
    kind: str
    rw: str
    bs: int
    qd: int
    queues: int
    passes: int
    seconds: float
    ios: int
    reads: int
    writes: int
    errors: int  # requests the device completed with a non-OK status
    iops: float
    mb_s: float
    latency: Latency
    per_queue: list[int]  # completions on each queue
    kicks: int
    verify_checked: int
    verify_unchecked: int
    verify_errors: int
    mismatches: list[str]  # the first few
    written: list[list[int]]  # [first block, count] runs written with `generation`
    split_buffers: int  # slot buffers that cross a break between hugepages (several segments)
    dma_extents: int  # physically contiguous stretches of the hugepage memory (1: no breaks)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> IoReport:
        return cls(**{**data, "latency": Latency(**data["latency"])})


@dataclass(frozen=True)
class IoCounters:
    """A running engine's totals so far (all passes), for watching a long run from outside."""

    t: float  # wall clock (time.time()) when taken
    ios: int
    reads: int
    writes: int
    errors: int
    verify_checked: int
    verify_errors: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Target(Protocol):
    """What the engine drives: request queues and how to put one block request on them."""

    kind: str
    meta_size: int
    block_size: int  # the device's logical block
    capacity: int  # bytes
    max_segments: int
    max_segment_bytes: int
    queues: Sequence[SplitQueue]

    def prepare(self, meta: memoryview, offset: int, slot: int) -> None: ...

    def submit(self, queue: SplitQueue, slot: int, meta: memoryview, offset: int, meta_addr: int,
               segments: Sequence[tuple[int, int]], write: bool, byte_offset: int, length: int) -> None: ...

    def ok(self, meta: memoryview, offset: int) -> bool: ...

    def flush(self) -> None: ...


class BlkTarget:
    """virtio-blk: header {type, 0, sector}, data, status byte."""

    kind = "blk"
    meta_size = 32
    block_size = 512

    def __init__(self, blk: BlkDevice) -> None:
        self.blk = blk
        self.capacity = blk.capacity * 512
        self.max_segments = blk.max_segments
        self.max_segment_bytes = blk.max_segment_bytes
        self.queues = blk.queues

    def prepare(self, meta: memoryview, offset: int, slot: int) -> None:
        pass

    def submit(self, queue: SplitQueue, slot: int, meta: memoryview, offset: int, meta_addr: int,
               segments: Sequence[tuple[int, int]], write: bool, byte_offset: int, length: int) -> None:
        _BLK_HEADER.pack_into(meta, offset, T_OUT if write else T_IN, 0, byte_offset >> 9)
        meta[offset + 16] = 0xFF
        queue.start(slot, len(segments) + 2)
        queue.add(meta_addr, 16, False)
        for addr, size in segments:
            queue.add(addr, size, not write)
        queue.add(meta_addr + 16, 1, True)

    def ok(self, meta: memoryview, offset: int) -> bool:
        return meta[offset + 16] == 0

    def flush(self) -> None:
        if self.blk.has(F_FLUSH):
            self.blk.flush()


class ScsiTarget:
    """One LUN of a virtio-scsi host: READ(16)/WRITE(16) with request, data and response."""

    kind = "scsi"
    meta_size = 192  # cmd_req (51 B) at 0, cmd_resp (108 B) at 64

    def __init__(self, host: ScsiHost, disk: Disk) -> None:
        self.host = host
        self.disk = disk
        self.block_size = disk.block_size
        self.capacity = disk.blocks * disk.block_size
        self.max_segments = max(host.config.seg_max, 1)
        self.max_segment_bytes = 1 << 31
        self.queues = host.queues[FIRST_REQUEST_QUEUE:]
        self._lun = encode_lun(disk.target, disk.lun)

    def prepare(self, meta: memoryview, offset: int, slot: int) -> None:
        CMD_REQ.pack_into(meta, offset, self._lun, slot, 0, 0, 0, bytes(32))

    def submit(self, queue: SplitQueue, slot: int, meta: memoryview, offset: int, meta_addr: int,
               segments: Sequence[tuple[int, int]], write: bool, byte_offset: int, length: int) -> None:
        _RW16.pack_into(meta, offset + _CDB_OFF, 0x8A if write else 0x88, 0, byte_offset // self.block_size,
                        length // self.block_size, 0, 0)
        meta[offset + _RESP_RESPONSE] = 0xFF
        queue.start(slot, len(segments) + 2)
        queue.add(meta_addr, CMD_REQ.size, False)
        if write:
            for addr, size in segments:
                queue.add(addr, size, False)
            queue.add(meta_addr + _RESP_OFF, 108, True)
        else:
            queue.add(meta_addr + _RESP_OFF, 108, True)
            for addr, size in segments:
                queue.add(addr, size, True)

    def ok(self, meta: memoryview, offset: int) -> bool:
        return meta[offset + _RESP_RESPONSE] == 0 and meta[offset + _RESP_STATUS] == 0

    def flush(self) -> None:
        self.host.synchronize_cache(self.disk.target, self.disk.lun)


Tick = Callable[["IoEngine"], bool]  # sees the running engine; False: stop submitting


class IoEngine:
    """Buffers and bookkeeping for `spec` on targets of `capacity` bytes; run() once per pass."""

    def __init__(self, dma: DmaMemory, spec: IoSpec, capacity: int, block_size: int, meta_size: int) -> None:
        spec.check()
        if spec.bs % block_size:
            raise VirtioError(f"--bs {spec.bs} is not a multiple of the device's {block_size} B blocks")
        total = capacity // spec.bs
        blocks = spec.blocks if spec.blocks is not None else total - spec.first_block
        if spec.first_block < 0 or blocks < 1 or spec.first_block + blocks > total:
            raise VirtioError(f"span of {blocks} blocks from {spec.first_block} does not fit the device's {total} blocks of {spec.bs} B")
        if blocks <= spec.qd * spec.queues:
            raise VirtioError(f"span of {blocks} blocks is too small for {spec.qd * spec.queues} requests in flight")
        self.spec = spec
        self.blocks = blocks
        self.meta_size = meta_size
        self.state = bytearray(blocks)  # _UNTOUCHED / _WRITTEN / _UNKNOWN per block
        self._busy = bytearray(blocks)
        self._rng = random.Random(spec.seed)
        self._cursor = 0
        self._meta = [dma.alloc(spec.qd * meta_size) for _ in range(spec.queues)]
        self._buffers = self._slot_buffers(dma)  # reads' (and, unless mixed, writes')
        self._write_buffers = self._slot_buffers(dma) if spec.mixed else self._buffers
        sets = [self._buffers, self._write_buffers] if spec.mixed else [self._buffers]
        self._every_buffer = [b for buffers in sets for q in buffers for b in q]
        self.dma_extents = len(dma.extents)
        self.split_buffers = sum(len(b.segments) > 1 for b in self._every_buffer)
        self.latencies: list[float] = []
        self.reads = self.writes = self.errors = 0
        self.checked = self.unchecked = self.verify_errors = 0
        self.mismatches: list[str] = []
        self.per_queue = [0] * spec.queues
        self.kicks = 0
        self.seconds = 0.0
        self.passes = 0

    def run(self, target: Target, tick: Tick | None = None) -> None:
        """One pass: keep qd requests in flight on each queue until the time or count is up or
        `tick` (called with the engine first thing and every TICK_SECONDS) returns False."""
        spec = self.spec
        if spec.until_stopped and tick is None:
            raise VirtioError("a run until stopped needs a tick that can stop it")
        queues = list(target.queues[: spec.queues])
        descriptors = max(len(b.segments) for b in self._every_buffer) + 2
        if len(queues) < spec.queues:
            raise VirtioError(f"{spec.queues} queues requested, the device set up {len(queues)}")
        if descriptors - 2 > target.max_segments:
            raise VirtioError(f"a {spec.bs} B buffer needs {descriptors - 2} segments, the device takes {target.max_segments}")
        longest = max(size for b in self._every_buffer for _addr, size in b.segments)
        if longest > target.max_segment_bytes:
            raise VirtioError(f"a {longest} B segment exceeds the device's size_max {target.max_segment_bytes}")
        for q in queues:
            if q.size < spec.qd * descriptors:
                raise VirtioError(f"--qd {spec.qd} needs {spec.qd * descriptors} descriptors, queue {q.index} has {q.size}")
        for meta in self._meta:
            for slot in range(spec.qd):
                target.prepare(meta.view, slot * self.meta_size, slot)
        sequential = not spec.rw.startswith("rand")
        always_write = spec.rw in ("write", "randwrite")
        mixed = spec.mixed
        limit = spec.ios if spec.ios is not None else 1 << 62
        deadline = time.perf_counter() + spec.seconds if spec.seconds is not None else float("inf")
        bs, first, seed, generation = spec.bs, spec.first_block, spec.seed, spec.generation
        rng = self._rng
        state, busy = self.state, self._busy
        latencies = self.latencies
        submitted = 0
        in_flight = 0
        slot_block = [[0] * spec.qd for _ in queues]
        slot_write = [[False] * spec.qd for _ in queues]
        slot_start = [[0.0] * spec.qd for _ in queues]
        kicks_before = sum(q.kicks for q in queues)

        def submit(qi: int, slot: int, now: float) -> None:
            nonlocal submitted, in_flight
            write = always_write or (mixed and rng.randrange(100) >= spec.rwmix_read)
            if sequential:
                block = self._cursor
                while busy[block]:
                    block = (block + 1) % self.blocks
                self._cursor = (block + 1) % self.blocks
            else:
                block = rng.randrange(self.blocks)
                while busy[block]:
                    block = rng.randrange(self.blocks)
            busy[block] = 1
            buffer = (self._write_buffers if write else self._buffers)[qi][slot]
            if write and spec.verify:
                stamp_block(buffer.view, first + block, generation, seed)
            meta = self._meta[qi]
            offset = slot * self.meta_size
            target.submit(queues[qi], slot, meta.view, offset, meta.addr + offset, buffer.segments, write,
                          (first + block) * bs, bs)
            slot_block[qi][slot] = block
            slot_write[qi][slot] = write
            slot_start[qi][slot] = now
            submitted += 1
            in_flight += 1

        def complete(qi: int, slot: int, now: float) -> None:
            nonlocal in_flight
            in_flight -= 1
            block = slot_block[qi][slot]
            busy[block] = 0
            latencies.append(now - slot_start[qi][slot])
            self.per_queue[qi] += 1
            meta = self._meta[qi]
            good = target.ok(meta.view, slot * self.meta_size)
            if slot_write[qi][slot]:
                self.writes += 1
                state[block] = _WRITTEN if good else _UNKNOWN
            else:
                self.reads += 1
                if good and spec.verify:
                    self._check(self._buffers[qi][slot].view, block)
            if not good:
                self.errors += 1

        start = time.perf_counter()
        next_tick = start
        for qi, q in enumerate(queues):
            for slot in range(spec.qd):
                if submitted < limit:
                    submit(qi, slot, time.perf_counter())
            q.flush()
        last_progress = start
        while in_flight:
            progressed = False
            for qi, q in enumerate(queues):
                done = q.poll()
                if not done:
                    continue
                progressed = True
                now = time.perf_counter()
                more = now < deadline
                for slot, _length in done:
                    complete(qi, slot, now)
                    if more and submitted < limit:
                        submit(qi, slot, now)
                q.flush()
            now = time.perf_counter()
            if progressed:
                last_progress = now
            elif now - last_progress > STALL_SECONDS:
                raise DeviceTimeout(f"no completion for {STALL_SECONDS}s with {in_flight} requests in flight")
            if tick is not None and now >= next_tick:
                next_tick = now + TICK_SECONDS
                if not tick(self):
                    deadline = float("-inf")  # submit no more; the requests in flight finish
        self.seconds += time.perf_counter() - start
        self.kicks += sum(q.kicks for q in queues) - kicks_before
        self.passes += 1
        if self.writes:
            target.flush()

    def _slot_buffers(self, dma: DmaMemory) -> list[list[SgBuffer]]:
        """qd buffers of bs bytes for each queue, each starting on a page of its own."""
        spec = self.spec
        data = [dma.alloc_sg(spec.qd * spec.bs, 4096) for _ in range(spec.queues)]
        return [[d.slice(i * spec.bs, spec.bs) for i in range(spec.qd)] for d in data]

    def counters(self) -> IoCounters:
        return IoCounters(time.time(), self.reads + self.writes, self.reads, self.writes, self.errors,
                          self.checked, self.verify_errors)

    def _check(self, view: memoryview, block: int) -> None:
        spec = self.spec
        st = self.state[block]
        if st == _WRITTEN:
            expected: int | None = spec.generation
        elif st == _UNTOUCHED and spec.prior is not None:
            expected = spec.prior or None  # prior 0: the block must read as zeros
        else:
            self.unchecked += 1
            return
        self.checked += 1
        bad = check_block(view, spec.first_block + block, expected, spec.seed)
        if bad is not None:
            self.verify_errors += 1
            if len(self.mismatches) < MAX_MISMATCHES:
                self.mismatches.append(str(bad))

    def written_runs(self) -> list[list[int]]:
        runs: list[list[int]] = []
        for block, st in enumerate(self.state):
            if st != _WRITTEN:
                continue
            lba = self.spec.first_block + block
            if runs and runs[-1][0] + runs[-1][1] == lba:
                runs[-1][1] += 1
            else:
                runs.append([lba, 1])
        return runs

    def report(self, device: str, kind: str) -> IoReport:
        spec = self.spec
        ios = self.reads + self.writes
        seconds = self.seconds or 1e-9
        return IoReport(
            device=device, kind=kind, rw=spec.rw, bs=spec.bs, qd=spec.qd, queues=spec.queues, passes=self.passes,
            seconds=round(self.seconds, 3), ios=ios, reads=self.reads, writes=self.writes, errors=self.errors,
            iops=round(ios / seconds, 1), mb_s=round(ios * spec.bs / seconds / 1e6, 2),
            latency=Latency.of(self.latencies), per_queue=self.per_queue, kicks=self.kicks,
            verify_checked=self.checked, verify_unchecked=self.unchecked, verify_errors=self.verify_errors,
            mismatches=self.mismatches, written=self.written_runs() if spec.verify else [],
            split_buffers=self.split_buffers, dma_extents=self.dma_extents,
        )
