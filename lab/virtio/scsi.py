"""virtio-scsi requests on a VirtioDevice (virtio 1.x, 5.6), as an initiator sees them.

ScsiHost negotiates the device, sets up control, event and request queues and runs synchronous
commands (CDB, data-out or data-in, response + status + sense + residual), task management and
asynchronous-notification requests, and event buffers. On top: the CDBs an initiator needs, a
target scan like SPDK's (REPORT LUNS, then per LUN INQUIRY, TEST UNIT READY, VPD 0x00/0xb2,
MODE SENSE for write protection, READ CAPACITY(10) and (16) when the 10-byte answer saturates)
and block read/write helpers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Sequence

from . import VirtioError
from .device import VirtioDevice, bit
from .transport import F_EVENT_IDX, F_INDIRECT_DESC, DmaBuffer, Transport

F_INOUT, F_HOTPLUG, F_CHANGE, F_T10_PI = 0, 1, 2, 3
DRIVER_FEATURES = bit(F_HOTPLUG) | bit(F_CHANGE) | bit(F_INDIRECT_DESC) | bit(F_EVENT_IDX)

CONFIG = struct.Struct("<IIIIIIIHHI")
CMD_REQ = struct.Struct("<8sQBBB32s")  # lun, tag, task_attr, prio, crn, cdb
CMD_RESP = struct.Struct("<IIHBB96s")  # sense_len, resid, status_qualifier, status, response, sense
TMF_REQ = struct.Struct("<II8sQ")
AN_REQ = struct.Struct("<I8sI")
AN_RESP = struct.Struct("<IB")
EVENT = struct.Struct("<I8sI")

CONTROL_QUEUE, EVENT_QUEUE, FIRST_REQUEST_QUEUE = 0, 1, 2
T_TMF, T_AN_QUERY, T_AN_SUBSCRIBE = 0, 1, 2
T_NO_EVENT, T_TRANSPORT_RESET, T_ASYNC_NOTIFY, T_PARAM_CHANGE = 0, 1, 2, 3
EVENTS_MISSED = 0x80000000
REASON_RESCAN, REASON_REMOVED = 1, 2

# transport responses
S_OK, S_OVERRUN, S_ABORTED, S_BAD_TARGET, S_RESET, S_BUSY = 0, 1, 2, 3, 4, 5
S_TRANSPORT_FAILURE, S_TARGET_FAILURE, S_NEXUS_FAILURE, S_FAILURE = 6, 7, 8, 9
S_FUNCTION_SUCCEEDED, S_FUNCTION_REJECTED, S_INCORRECT_LUN = 10, 11, 12
S_FUNCTION_COMPLETE = S_OK

# task management functions
TMF_ABORT_TASK, TMF_ABORT_TASK_SET, TMF_CLEAR_ACA, TMF_CLEAR_TASK_SET = 0, 1, 2, 3
TMF_I_T_NEXUS_RESET, TMF_LOGICAL_UNIT_RESET, TMF_QUERY_TASK, TMF_QUERY_TASK_SET = 4, 5, 6, 7

GOOD, CHECK_CONDITION = 0x00, 0x02
KEY_NO_SENSE, KEY_NOT_READY, KEY_ILLEGAL_REQUEST, KEY_DATA_PROTECT = 0x0, 0x2, 0x5, 0x7
KEY_UNIT_ATTENTION = 0x6
UNIT_ATTENTION_RETRIES = 3  # a LUN reports power-on/reset once per event, then answers

_REQ_OFF, _RESP_OFF, _DATA_OFF = 0, 64, 256
_EVENT_BUFFER = 64


def qemu_config(num_queues: int, virtqueue_size: int = 128) -> bytes:
    """The config space QEMU 7.2 builds for vhost-user-scsi (the back end never sees it)."""
    return CONFIG.pack(num_queues, virtqueue_size - 2, 0xFFFF, 128, EVENT.size, 96, 32, 0, 255, 16383)


def encode_lun(target: int, lun: int) -> bytes:
    if not 0 <= target <= 255 or not 0 <= lun <= 16383:
        raise VirtioError(f"LUN {target}:{lun} cannot be addressed (targets 0..255, LUNs 0..16383)")
    return bytes([1, target, (0x40 | lun >> 8) if lun > 255 else 0, lun & 0xFF]) + bytes(4)


@dataclass(frozen=True)
class ScsiConfig:
    num_queues: int
    seg_max: int
    max_sectors: int
    cmd_per_lun: int
    event_info_size: int
    sense_size: int
    cdb_size: int
    max_channel: int
    max_target: int
    max_lun: int

    @classmethod
    def parse(cls, data: bytes) -> ScsiConfig:
        return cls(*CONFIG.unpack(data[: CONFIG.size]))


@dataclass(frozen=True)
class Sense:
    key: int
    asc: int
    ascq: int

    @classmethod
    def parse(cls, data: bytes) -> Sense | None:
        if len(data) >= 14 and data[0] & 0x7F in (0x70, 0x71):
            return cls(data[2] & 0x0F, data[12], data[13])
        if len(data) >= 4 and data[0] & 0x7F in (0x72, 0x73):
            return cls(data[1] & 0x0F, data[2], data[3])
        return None


@dataclass(frozen=True)
class Result:
    response: int
    status: int
    sense_data: bytes
    resid: int
    data: bytes  # the data-in bytes the device wrote (buffer size minus residual)

    @property
    def ok(self) -> bool:
        return self.response == S_OK and self.status == GOOD

    @property
    def sense(self) -> Sense | None:
        return Sense.parse(self.sense_data)

    def check(self, what: str) -> Result:
        if not self.ok:
            raise ScsiError(what, self)
        return self


class ScsiError(VirtioError):
    def __init__(self, what: str, result: Result) -> None:
        sense = result.sense
        detail = f", sense {sense.key:#x}/{sense.asc:#04x}/{sense.ascq:#04x}" if sense else ""
        super().__init__(f"{what}: response {result.response}, status {result.status:#x}{detail}")
        self.result = result


@dataclass(frozen=True)
class Event:
    event: int
    lun: bytes
    reason: int

    @property
    def missed(self) -> bool:
        return bool(self.event & EVENTS_MISSED)

    @property
    def kind(self) -> int:
        return self.event & ~EVENTS_MISSED

    @property
    def address(self) -> tuple[int, int]:
        return self.lun[1], (self.lun[2] & 0x3F) << 8 | self.lun[3]


@dataclass(frozen=True)
class Disk:
    """A logical unit found by scan()."""

    target: int
    lun: int
    blocks: int
    block_size: int
    read_only: bool
    unmap: bool  # VPD 0xb2 says UNMAP works


class ScsiHost:
    """A negotiated, running virtio-scsi device with `num_queues` request queues."""

    def __init__(
        self,
        transport: Transport,
        *,
        num_queues: int = 1,
        queue_size: int = 128,
        without: int = 0,
        timeout: float = 10.0,
        data_size: int = 1 << 20,
    ) -> None:
        self.transport = transport
        self.timeout = timeout
        self.device = VirtioDevice(transport)
        self._event_buffers: dict[int, DmaBuffer] = {}
        try:
            self.features = self.device.negotiate(DRIVER_FEATURES & ~without)
            self.config = ScsiConfig.parse(self.device.read_config(0, CONFIG.size))
            if not 1 <= num_queues <= self.config.num_queues:
                raise VirtioError(f"{num_queues} request queues requested, the device offers {self.config.num_queues}")
            self.queues = self.device.setup_queues(FIRST_REQUEST_QUEUE + num_queues, queue_size)
            self._scratch = [self.device.alloc_dma(_DATA_OFF + data_size) for _ in self.queues]
            self.device.driver_ok()
        except BaseException:
            self.device.reset()
            raise
        self.data_size = data_size
        self._token = 0

    def has(self, feature_bit: int) -> bool:
        return self.device.has(feature_bit)

    # ---- raw requests ---------------------------------------------------------------------

    def submit(
        self, queue: int, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]],
        indirect: bool = False,
    ) -> int:
        """One chain of (device address, length) buffers on queue `queue` (a virtqueue index);
        waits for it and returns the used length."""
        return self.queues[queue].call(readable, writable, self.timeout, indirect)

    def command(
        self, target: int, lun: int, cdb: bytes, *, data_out: bytes = b"", data_in: int = 0, queue: int = 0,
        tag: int = 0,
    ) -> Result:
        """One SCSI command on request queue `queue` (0-based among request queues)."""
        if len(cdb) > 32:
            raise VirtioError(f"CDB of {len(cdb)} bytes exceeds 32")
        if max(len(data_out), data_in) > self.data_size:
            raise VirtioError(f"{max(len(data_out), data_in)} data bytes exceed the {self.data_size} B buffer")
        index = FIRST_REQUEST_QUEUE + queue
        scratch = self._scratch[index]
        view, base = scratch.view, scratch.addr
        CMD_REQ.pack_into(view, _REQ_OFF, encode_lun(target, lun), tag, 0, 0, 0, cdb.ljust(32, b"\0"))
        view[_RESP_OFF : _RESP_OFF + CMD_RESP.size] = b"\xff" * CMD_RESP.size
        readable = [(base + _REQ_OFF, CMD_REQ.size)]
        writable = [(base + _RESP_OFF, CMD_RESP.size)]
        if data_out:
            view[_DATA_OFF : _DATA_OFF + len(data_out)] = data_out
            readable.append((base + _DATA_OFF, len(data_out)))
        if data_in:
            view[_DATA_OFF : _DATA_OFF + data_in] = bytes(data_in)
            writable.append((base + _DATA_OFF, data_in))
        self.submit(index, readable, writable)
        return self.parse_response(bytes(view[_RESP_OFF : _RESP_OFF + CMD_RESP.size]),
                                   bytes(view[_DATA_OFF : _DATA_OFF + data_in]))

    @staticmethod
    def parse_response(resp: bytes, data_in: bytes) -> Result:
        sense_len, resid, _qualifier, status, response, sense = CMD_RESP.unpack(resp)
        moved = max(len(data_in) - resid, 0)
        return Result(response, status, sense[: min(sense_len, len(sense))], resid, data_in[:moved])

    def tmf(self, function: int, target: int, lun: int, tag: int = 0) -> int:
        """A task management function; the transport response (S_FUNCTION_COMPLETE, ...)."""
        scratch = self._scratch[CONTROL_QUEUE]
        TMF_REQ.pack_into(scratch.view, _REQ_OFF, T_TMF, function, encode_lun(target, lun), tag)
        scratch.view[_RESP_OFF] = 0xFF
        self.submit(CONTROL_QUEUE, [(scratch.addr + _REQ_OFF, TMF_REQ.size)], [(scratch.addr + _RESP_OFF, 1)])
        return scratch.view[_RESP_OFF]

    def async_notification(self, kind: int, target: int, lun: int, events: int) -> tuple[int, int]:
        """AN query (T_AN_QUERY) or subscribe (T_AN_SUBSCRIBE): (event_actual, response)."""
        scratch = self._scratch[CONTROL_QUEUE]
        AN_REQ.pack_into(scratch.view, _REQ_OFF, kind, encode_lun(target, lun), events)
        scratch.view[_RESP_OFF : _RESP_OFF + AN_RESP.size] = b"\xff" * AN_RESP.size
        self.submit(CONTROL_QUEUE, [(scratch.addr + _REQ_OFF, AN_REQ.size)],
                    [(scratch.addr + _RESP_OFF, AN_RESP.size)])
        return AN_RESP.unpack_from(scratch.view, _RESP_OFF)

    # ---- events ---------------------------------------------------------------------------

    def post_event_buffers(self, count: int) -> None:
        q = self.queues[EVENT_QUEUE]
        for _ in range(count):
            buffer = self.device.alloc_dma(_EVENT_BUFFER)
            self._token += 1
            self._event_buffers[self._token] = buffer
            q.start(self._token, 1)
            q.add(buffer.addr, EVENT.size, True)
        q.flush()

    def events(self, timeout: float) -> list[Event]:
        """Events the device reported within `timeout` s; each buffer is posted again."""
        q = self.queues[EVENT_QUEUE]
        out = []
        for token, _used in q.reap(timeout):
            buffer = self._event_buffers[token]
            out.append(Event(*EVENT.unpack_from(buffer.view)))
            buffer.view[: EVENT.size] = bytes(EVENT.size)
            q.start(token, 1)
            q.add(buffer.addr, EVENT.size, True)
        q.flush()
        return out

    # ---- commands -------------------------------------------------------------------------

    def inquiry(self, target: int, lun: int, page: int | None = None, allocation: int = 255) -> Result:
        evpd = 0 if page is None else 1
        cdb = bytes([0x12, evpd, page or 0]) + allocation.to_bytes(2, "big") + b"\0"
        return self.command(target, lun, cdb, data_in=allocation)

    def vpd_pages(self, target: int, lun: int) -> list[int]:
        data = self.inquiry(target, lun, 0x00).check("INQUIRY VPD 0x00").data
        return list(data[4 : 4 + int.from_bytes(data[2:4], "big")])

    def test_unit_ready(self, target: int, lun: int) -> Result:
        return self.command(target, lun, bytes(6))

    def unit_ready(self, target: int, lun: int) -> bool:
        """TEST UNIT READY, repeated while the LUN reports a unit attention (as after a reset)."""
        for _ in range(UNIT_ATTENTION_RETRIES + 1):
            result = self.test_unit_ready(target, lun)
            sense = result.sense
            if result.ok or sense is None or sense.key != KEY_UNIT_ATTENTION:
                return result.ok
        return False

    def report_luns(self, target: int, allocation: int = 4096, select: int = 0) -> list[int]:
        cdb = bytes([0xA0, 0, select, 0, 0, 0]) + allocation.to_bytes(4, "big") + bytes(2)
        data = self.command(target, 0, cdb, data_in=allocation).check(f"REPORT LUNS on target {target}").data
        length = int.from_bytes(data[:4], "big")
        entries = data[8 : 8 + length]
        return [(e[0] & 0x3F) << 8 | e[1] for e in (entries[i : i + 8] for i in range(0, len(entries), 8))]

    def read_capacity(self, target: int, lun: int) -> tuple[int, int]:
        """(blocks, block size): READ CAPACITY(10), then (16) if the LBA does not fit 32 bits."""
        data = self.command(target, lun, bytes([0x25]) + bytes(9), data_in=8).check("READ CAPACITY(10)").data
        last, block_size = struct.unpack(">II", data)
        if last == 0xFFFFFFFF:
            cdb = bytes([0x9E, 0x10]) + bytes(8) + (32).to_bytes(4, "big") + bytes(2)
            data = self.command(target, lun, cdb, data_in=32).check("READ CAPACITY(16)").data
            last, block_size = struct.unpack(">QI", data[:12])
        return last + 1, block_size

    def write_protected(self, target: int, lun: int) -> bool:
        data = self.command(target, lun, bytes([0x1A, 0x08, 0x3F, 0, 192, 0]), data_in=192).check("MODE SENSE(6)").data
        return bool(data[2] & 0x80)

    def read(self, target: int, lun: int, lba: int, count: int, block_size: int = 512, queue: int = 0) -> bytes:
        cdb = bytes([0x88, 0]) + lba.to_bytes(8, "big") + count.to_bytes(4, "big") + bytes(2)
        result = self.command(target, lun, cdb, data_in=count * block_size, queue=queue)
        return result.check(f"READ(16) {target}:{lun} lba {lba}").data

    def write(self, target: int, lun: int, lba: int, data: bytes, block_size: int = 512, queue: int = 0) -> None:
        count = len(data) // block_size
        cdb = bytes([0x8A, 0]) + lba.to_bytes(8, "big") + count.to_bytes(4, "big") + bytes(2)
        self.command(target, lun, cdb, data_out=data, queue=queue).check(f"WRITE(16) {target}:{lun} lba {lba}")

    def synchronize_cache(self, target: int, lun: int) -> None:
        self.command(target, lun, bytes([0x35]) + bytes(9)).check("SYNCHRONIZE CACHE(10)")

    def scan(self, targets: Sequence[int] | None = None) -> list[Disk]:
        """What an initiator does at start: every target, every reported LUN, disks only."""
        disks = []
        for target in targets if targets is not None else range(self.config.max_target + 1):
            probe = self.command(target, 0, bytes([0xA0, 0, 0, 0, 0, 0]) + (16).to_bytes(4, "big") + bytes(2),
                                 data_in=16)
            if probe.response == S_BAD_TARGET:
                continue
            for lun in self.report_luns(target):
                standard = self.inquiry(target, lun, allocation=36).check(f"INQUIRY {target}:{lun}").data
                if standard[0] != 0x00:  # qualifier 0, direct-access block device
                    continue
                if not self.unit_ready(target, lun):
                    continue
                pages = self.vpd_pages(target, lun)
                unmap = False
                if 0xB2 in pages:
                    unmap = bool(self.inquiry(target, lun, 0xB2).check("INQUIRY VPD 0xb2").data[5] & 0x80)
                blocks, block_size = self.read_capacity(target, lun)
                disks.append(Disk(target, lun, blocks, block_size, self.write_protected(target, lun), unmap))
        return disks

    def close(self) -> None:
        self.device.close()
