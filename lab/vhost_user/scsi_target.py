"""A SCSI target: targets holding logical units, each a raw image file, and the commands a Linux
initiator (virtio_scsi + sd) and an SPDK-like scan send. Pure logic: no virtio, no rings - a
command is a CDB plus data-out and data-in views, its outcome a transport response, a SCSI status,
fixed-format sense data and how many bytes moved. Unit-testable on bytearrays.

Decisions, following QEMU's virtio-scsi + scsi-bus + scsi-disk where Linux depends on them:
- An absent target: transport response BAD_TARGET (the guest probes every target).
- An absent LUN on a present target: the target itself answers (response OK): INQUIRY gives
  peripheral qualifier 3 / type 0x1f with full standard data (so Linux records the SCSI level
  and sends REPORT LUNS), REPORT LUNS works, REQUEST SENSE returns LOGICAL UNIT NOT SUPPORTED,
  everything else is CHECK CONDITION ILLEGAL REQUEST 0x25. Linux turns the INCORRECT_LUN
  response into a retried DID_ERROR, so that response is only used for task management.
- A transfer length in the CDB larger than the buffer of that direction: response OVERRUN,
  nothing executed (QEMU does the same). The residual is always buffer size minus bytes moved.
- No well-known logical units: SELECT REPORT 1 returns an empty list, W-LUN addresses are
  not routed (BAD_TARGET, as QEMU).
- Non-removable disks, but START STOP UNIT works: START=0 stops the unit (NOT READY 0x04/0x02
  for media access), LOEJ=1 START=0 unloads the medium (NOT READY 0x3a), LOEJ=1 START=1 loads it.
"""

from __future__ import annotations

import enum
import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Callable

from lab.errors import LabError
from lab.vhost_user.device import Buffers
from lab.vhost_user.image import fill_range, open_image, punch_hole, transfer, zero_range

BLOCK = 512
MAX_TARGET = 255
MAX_LUN = 16383
VENDOR = b"LAB     "
PRODUCT = b"VHOST-USER DISK "
REVISION = b"0001"
SENSE_SIZE = 18

# Limits advertised in VPD 0xb0 (in blocks / descriptors).
MAX_TRANSFER_BLOCKS = 0xFFFF
MAX_UNMAP_BLOCKS = 1 << 22
MAX_UNMAP_DESCRIPTORS = 64
MAX_WRITE_SAME_BLOCKS = 1 << 22
UNMAP_GRANULARITY = 8  # 4 KiB: the file system punches whole pages

GOOD, CHECK_CONDITION = 0x00, 0x02


class Response(enum.IntEnum):
    """virtio-scsi transport responses (the same numbers for commands and task management)."""

    OK = 0
    OVERRUN = 1
    ABORTED = 2
    BAD_TARGET = 3
    RESET = 4
    BUSY = 5
    TRANSPORT_FAILURE = 6
    TARGET_FAILURE = 7
    NEXUS_FAILURE = 8
    FAILURE = 9
    FUNCTION_SUCCEEDED = 10
    FUNCTION_REJECTED = 11
    INCORRECT_LUN = 12


FUNCTION_COMPLETE = Response.OK  # what OK means for task management


class Tmf(enum.IntEnum):
    ABORT_TASK = 0
    ABORT_TASK_SET = 1
    CLEAR_ACA = 2
    CLEAR_TASK_SET = 3
    I_T_NEXUS_RESET = 4
    LOGICAL_UNIT_RESET = 5
    QUERY_TASK = 6
    QUERY_TASK_SET = 7


class Key(enum.IntEnum):
    NO_SENSE = 0x0
    NOT_READY = 0x2
    ILLEGAL_REQUEST = 0x5
    DATA_PROTECT = 0x7


@dataclass(frozen=True)
class Sense:
    key: int
    asc: int
    ascq: int = 0
    #: sense-key specific field pointer: (byte, in the CDB (True) or parameter list (False))
    field: tuple[int, bool] | None = None

    def fixed(self) -> bytes:
        """Fixed-format (0x70) sense data, current error."""
        data = bytearray(SENSE_SIZE)
        data[0] = 0x70
        data[2] = self.key
        data[7] = SENSE_SIZE - 8
        data[12], data[13] = self.asc, self.ascq
        if self.field is not None:
            offset, in_cdb = self.field
            data[15] = 0x80 | (0x40 if in_cdb else 0)
            data[16:18] = offset.to_bytes(2, "big")
        return bytes(data)


NO_SENSE = Sense(Key.NO_SENSE, 0x00)
INVALID_OPCODE = Sense(Key.ILLEGAL_REQUEST, 0x20)
LBA_OUT_OF_RANGE = Sense(Key.ILLEGAL_REQUEST, 0x21)
LUN_NOT_SUPPORTED = Sense(Key.ILLEGAL_REQUEST, 0x25)
PARAMETER_LIST_LENGTH = Sense(Key.ILLEGAL_REQUEST, 0x1A)
SAVING_NOT_SUPPORTED = Sense(Key.ILLEGAL_REQUEST, 0x39)
WRITE_PROTECTED = Sense(Key.DATA_PROTECT, 0x27)
NOT_READY_STOPPED = Sense(Key.NOT_READY, 0x04, 0x02)
MEDIUM_NOT_PRESENT = Sense(Key.NOT_READY, 0x3A)


def invalid_field(offset: int, in_cdb: bool = True) -> Sense:
    return Sense(Key.ILLEGAL_REQUEST, 0x24 if in_cdb else 0x26, 0, (offset, in_cdb))


class CheckCondition(Exception):
    def __init__(self, sense: Sense) -> None:
        super().__init__(f"sense {sense.key:#x}/{sense.asc:#x}/{sense.ascq:#x}")
        self.sense = sense


class Overrun(Exception):
    """The CDB asks to move more bytes than the buffer of that direction holds."""


@dataclass
class Outcome:
    response: Response = Response.OK
    status: int = GOOD
    sense: bytes = b""
    #: bytes moved through the buffer of the command's direction
    transferred: int = 0


class Io:
    """The data buffers of one command, with the length rules applied before anything moves."""

    def __init__(self, data_out: list[memoryview], data_in: list[memoryview]) -> None:
        self.data_out = data_out
        self.data_in = data_in
        self.out_size = Buffers.total(data_out)
        self.in_size = Buffers.total(data_in)
        self.transferred = 0

    def need_in(self, nbytes: int) -> None:
        if nbytes > self.in_size:
            raise Overrun(f"{nbytes} bytes of data-in, buffer holds {self.in_size}")

    def need_out(self, nbytes: int) -> None:
        if nbytes > self.out_size:
            raise Overrun(f"{nbytes} bytes of data-out, buffer holds {self.out_size}")

    def reply(self, payload: bytes, allocation: int) -> None:
        """Data-in of an emulated command: at most `allocation` bytes of `payload`."""
        self.need_in(allocation)
        self.transferred = Buffers.scatter(self.data_in, 0, payload[:allocation])

    def in_views(self, nbytes: int) -> list[memoryview]:
        self.need_in(nbytes)
        self.transferred = nbytes
        return Buffers.slice(self.data_in, 0, nbytes)

    def out_views(self, nbytes: int) -> list[memoryview]:
        self.need_out(nbytes)
        self.transferred = nbytes
        return Buffers.slice(self.data_out, 0, nbytes)

    def out_bytes(self, nbytes: int) -> bytes:
        return b"".join(bytes(v) for v in self.out_views(nbytes))


def cdb_length(opcode: int) -> int:
    return {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}.get(opcode >> 5, 0)


def _be(cdb: bytes, start: int, size: int) -> int:
    return int.from_bytes(cdb[start : start + size], "big")


# ---- logical units -------------------------------------------------------------------------


class LogicalUnit:
    """A direct-access block device on a raw image (512-byte blocks)."""

    def __init__(self, path: str, read_only: bool, target: int, lun: int) -> None:
        self.path = path
        self.read_only = read_only
        self.fd, size = open_image(path, read_only, BLOCK)
        self.blocks = size // BLOCK
        self.started = True
        self.loaded = True
        digest = hashlib.sha256(f"{target}:{lun}:{os.path.realpath(path)}".encode()).digest()
        self.serial = digest[:8].hex().upper().encode()
        # NAA 3 (locally assigned): 4-bit NAA, 60-bit value
        self.naa = bytes([0x30 | digest[8] & 0x0F]) + digest[9:16]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def ready(self) -> None:
        """Media access is possible, or the NOT READY sense that says why not."""
        if not self.loaded:
            raise CheckCondition(MEDIUM_NOT_PRESENT)
        if not self.started:
            raise CheckCondition(NOT_READY_STOPPED)

    def check_range(self, lba: int, count: int) -> None:
        if lba + count > self.blocks:
            raise CheckCondition(LBA_OUT_OF_RANGE)

    def writable(self) -> None:
        if self.read_only:
            raise CheckCondition(WRITE_PROTECTED)


# ---- commands ------------------------------------------------------------------------------

Handler = Callable[["ScsiTarget", "Command"], None]


@dataclass
class Command:
    target: int
    lun: int
    unit: LogicalUnit | None  # None: the LUN is absent on a present target
    cdb: bytes
    io: Io

    def present(self) -> LogicalUnit:
        if self.unit is None:
            raise CheckCondition(LUN_NOT_SUPPORTED)
        return self.unit


@dataclass(frozen=True)
class CommandInfo:
    name: str
    handler: Handler
    #: CDB usage bitmap for REPORT SUPPORTED OPERATION CODES (its length is the CDB length)
    usage: bytes
    service_action: int | None = None


def _usage(hexstr: str) -> bytes:
    return bytes.fromhex(hexstr)


class ScsiTarget:
    """Every target and logical unit of one virtio-scsi device."""

    def __init__(self) -> None:
        self.units: dict[tuple[int, int], LogicalUnit] = {}

    # ---- configuration -----------------------------------------------------------------

    def add(self, target: int, lun: int, path: str, read_only: bool = False) -> LogicalUnit:
        if not 0 <= target <= MAX_TARGET or not 0 <= lun <= MAX_LUN:
            raise LabError(f"LUN {target}:{lun} outside targets 0..{MAX_TARGET}, LUNs 0..{MAX_LUN}")
        if (target, lun) in self.units:
            raise LabError(f"LUN {target}:{lun} is already in use (by {self.units[target, lun].path})")
        unit = LogicalUnit(path, read_only, target, lun)
        self.units[target, lun] = unit
        return unit

    def remove(self, target: int, lun: int) -> None:
        unit = self.units.pop((target, lun), None)
        if unit is None:
            raise LabError(f"LUN {target}:{lun} does not exist")
        unit.close()

    def has_target(self, target: int) -> bool:
        return any(t == target for t, _ in self.units)

    def luns(self, target: int) -> list[int]:
        return sorted(lun for t, lun in self.units if t == target)

    def flush(self) -> None:
        for unit in self.units.values():
            if not unit.read_only:
                os.fsync(unit.fd)

    def close(self) -> None:
        for unit in self.units.values():
            unit.close()
        self.units.clear()

    # ---- commands ----------------------------------------------------------------------

    def execute(
        self, target: int, lun: int, cdb: bytes, data_out: list[memoryview], data_in: list[memoryview]
    ) -> Outcome:
        if not self.has_target(target):
            return Outcome(Response.BAD_TARGET)
        if data_out and data_in:
            return Outcome(Response.FAILURE)  # bidirectional commands (F_INOUT) are not offered
        io = Io(data_out, data_in)
        command = Command(target, lun, self.units.get((target, lun)), cdb, io)
        try:
            info = self._lookup(cdb)
            control = cdb_length(cdb[0]) - 1
            if cdb[control] & 0x04:
                raise CheckCondition(invalid_field(control))  # NACA: NORMACA is not supported
            info.handler(self, command)
        except CheckCondition as exc:
            return Outcome(Response.OK, CHECK_CONDITION, exc.sense.fixed(), io.transferred)
        except Overrun:
            return Outcome(Response.OVERRUN)
        return Outcome(Response.OK, GOOD, b"", io.transferred)

    def _lookup(self, cdb: bytes) -> CommandInfo:
        opcode = cdb[0]
        if opcode in SERVICE_ACTIONS:
            info = COMMANDS.get((opcode, cdb[1] & 0x1F))
            if info is None:
                raise CheckCondition(invalid_field(1))
            return info
        info = COMMANDS.get((opcode, None))
        if info is None:
            raise CheckCondition(INVALID_OPCODE)
        return info

    # ---- task management (requests are synchronous: nothing is ever pending) ------------

    def task_management(self, target: int, lun: int, function: int) -> Response:
        if function == Tmf.CLEAR_ACA or function not in set(Tmf):
            return Response.FUNCTION_REJECTED  # NORMACA is not supported, nor unknown functions
        if not self.has_target(target):
            return Response.BAD_TARGET
        if function == Tmf.I_T_NEXUS_RESET:
            return FUNCTION_COMPLETE
        if (target, lun) not in self.units:
            return Response.INCORRECT_LUN
        if function == Tmf.LOGICAL_UNIT_RESET:
            self.units[target, lun].started = True
        # ABORT TASK / ABORT TASK SET / CLEAR TASK SET: no such task, nothing to abort;
        # QUERY TASK / QUERY TASK SET: no task is in the task set - FUNCTION COMPLETE, never
        # FUNCTION SUCCEEDED.
        return FUNCTION_COMPLETE

    # ---- command handlers --------------------------------------------------------------

    def _test_unit_ready(self, c: Command) -> None:
        c.present().ready()

    def _request_sense(self, c: Command) -> None:
        if c.cdb[1] & 0x01:
            raise CheckCondition(invalid_field(1))  # descriptor format is not supported
        sense = NO_SENSE if c.unit is not None else LUN_NOT_SUPPORTED
        if c.unit is not None and not c.unit.loaded:
            sense = MEDIUM_NOT_PRESENT
        elif c.unit is not None and not c.unit.started:
            sense = NOT_READY_STOPPED
        c.io.reply(sense.fixed(), c.cdb[4])

    def _inquiry(self, c: Command) -> None:
        evpd, page, allocation = c.cdb[1] & 0x01, c.cdb[2], _be(c.cdb, 3, 2)
        if c.cdb[1] & 0xFE:
            raise CheckCondition(invalid_field(1))
        if not evpd:
            if page:
                raise CheckCondition(invalid_field(2))
            c.io.reply(self._standard_inquiry(c.unit), allocation)
            return
        if c.unit is None:
            raise CheckCondition(LUN_NOT_SUPPORTED)
        builder = VPD_PAGES.get(page)
        if builder is None:
            raise CheckCondition(invalid_field(2))
        body = builder(c.unit)
        c.io.reply(bytes([0x00, page]) + len(body).to_bytes(2, "big") + body, allocation)

    @staticmethod
    def _standard_inquiry(unit: LogicalUnit | None) -> bytes:
        peripheral = 0x00 if unit is not None else 0x7F  # qualifier 3, type 0x1f: no LU here
        # version 5 (SPC-3), HISUP + response format 2, CMDQUE
        head = bytes([peripheral, 0x00, 0x05, 0x12, 31, 0x00, 0x00, 0x02])
        return head + VENDOR + PRODUCT + REVISION

    def _report_luns(self, c: Command) -> None:
        select, allocation = c.cdb[2], _be(c.cdb, 6, 4)
        if select not in (0x00, 0x01, 0x02):
            raise CheckCondition(invalid_field(2))
        if allocation < 16:
            raise CheckCondition(invalid_field(6))
        luns = [] if select == 0x01 else self.luns(c.target)  # no well-known LUs
        entries = b"".join(encode_lun(lun) for lun in luns)
        c.io.reply(len(entries).to_bytes(4, "big") + bytes(4) + entries, allocation)

    def _read_capacity10(self, c: Command) -> None:
        if not c.cdb[8] & 0x01 and _be(c.cdb, 2, 4):
            raise CheckCondition(invalid_field(2))  # an LBA without PMI
        unit = c.present()
        c.io.need_in(8)
        unit.ready()
        last = min(unit.blocks - 1, 0xFFFFFFFF)
        c.io.reply(struct.pack(">II", last, BLOCK), 8)

    def _read_capacity16(self, c: Command) -> None:
        allocation = _be(c.cdb, 10, 4)
        unit = c.present()
        c.io.need_in(allocation)
        unit.ready()
        # LBPME (UNMAP / WRITE SAME unmap supported) and LBPRZ (holes read as zeros)
        data = struct.pack(">QIBBH", unit.blocks - 1, BLOCK, 0, 0, 0xC000) + bytes(16)
        c.io.reply(data, allocation)

    def _mode_sense(self, c: Command) -> None:
        ten = c.cdb[0] == 0x5A
        dbd = bool(c.cdb[1] & 0x08)
        long_lba = ten and bool(c.cdb[1] & 0x10)
        control, page, subpage = c.cdb[2] >> 6, c.cdb[2] & 0x3F, c.cdb[3]
        allocation = _be(c.cdb, 7, 2) if ten else c.cdb[4]
        unit = c.present()
        if control == 3:
            raise CheckCondition(SAVING_NOT_SUPPORTED)
        if subpage and not (page == 0x3F and subpage == 0xFF):
            raise CheckCondition(invalid_field(3))
        wanted = (0x08, 0x0A) if page == 0x3F else (page,)
        if any(p not in MODE_PAGES for p in wanted):
            raise CheckCondition(invalid_field(2))
        pages = b"".join(MODE_PAGES[p](unit, control == 1) for p in wanted)
        descriptor = b""
        if not dbd:
            if long_lba:
                descriptor = struct.pack(">QII", unit.blocks, 0, BLOCK)
            else:
                descriptor = struct.pack(">II", min(unit.blocks, 0xFFFFFFFF), BLOCK)
        specific = 0x80 if unit.read_only else 0x00  # WP
        if ten:
            length = 6 + len(descriptor) + len(pages)
            header = struct.pack(">HBBBBH", length, 0, specific, int(long_lba), 0, len(descriptor))
        else:
            header = bytes([3 + len(descriptor) + len(pages), 0, specific, len(descriptor)])
        c.io.reply(header + descriptor + pages, allocation)

    def _start_stop(self, c: Command) -> None:
        unit = c.present()
        if c.cdb[4] & 0xF0:
            raise CheckCondition(invalid_field(4))  # power conditions are not supported
        start, load_eject = bool(c.cdb[4] & 0x01), bool(c.cdb[4] & 0x02)
        if load_eject:
            unit.loaded = start
        unit.started = start

    def _rw(self, c: Command) -> None:
        opcode = c.cdb[0]
        write = opcode in (0x0A, 0x2A, 0x8A)
        if opcode in (0x08, 0x0A):
            lba = _be(c.cdb, 1, 3) & 0x1FFFFF
            count = c.cdb[4] or 256
        elif opcode in (0x28, 0x2A):
            lba, count = _be(c.cdb, 2, 4), _be(c.cdb, 7, 2)
        else:
            lba, count = _be(c.cdb, 2, 8), _be(c.cdb, 10, 4)
        if opcode not in (0x08, 0x0A) and c.cdb[1] & 0xE0:
            raise CheckCondition(invalid_field(1))  # RDPROTECT/WRPROTECT: no protection info
        unit = c.present()
        nbytes = count * BLOCK
        if write:
            c.io.need_out(nbytes)
        else:
            c.io.need_in(nbytes)
        unit.ready()
        if write:
            unit.writable()
        unit.check_range(lba, count)
        if not count:
            return
        if write:
            transfer(os.pwritev, unit.fd, c.io.out_views(nbytes), lba * BLOCK)
            if opcode != 0x0A and c.cdb[1] & 0x08:  # FUA
                os.fdatasync(unit.fd)
        else:
            transfer(os.preadv, unit.fd, c.io.in_views(nbytes), lba * BLOCK)

    def _synchronize_cache(self, c: Command) -> None:
        if c.cdb[0] == 0x35:
            lba, count = _be(c.cdb, 2, 4), _be(c.cdb, 7, 2)
        else:
            lba, count = _be(c.cdb, 2, 8), _be(c.cdb, 10, 4)
        unit = c.present()
        unit.ready()
        unit.check_range(lba, count)
        if not unit.read_only:
            os.fdatasync(unit.fd)

    def _unmap(self, c: Command) -> None:
        if c.cdb[1] & 0x01:
            raise CheckCondition(invalid_field(1))  # ANCHOR: anchored LBAs are not supported
        length = _be(c.cdb, 7, 2)
        unit = c.present()
        c.io.need_out(length)
        unit.ready()
        unit.writable()
        if length == 0:
            return
        if length < 8:
            raise CheckCondition(PARAMETER_LIST_LENGTH)
        params = c.io.out_bytes(length)
        descriptors_length = min(_be(params, 2, 2), length - 8)
        count = descriptors_length // 16
        if count > MAX_UNMAP_DESCRIPTORS:
            raise CheckCondition(invalid_field(2, in_cdb=False))
        ranges = []
        for i in range(count):
            lba, blocks = struct.unpack_from(">QI", params, 8 + 16 * i)
            if blocks > MAX_UNMAP_BLOCKS:
                raise CheckCondition(invalid_field(8 + 16 * i + 8, in_cdb=False))
            unit.check_range(lba, blocks)
            ranges.append((lba, blocks))
        for lba, blocks in ranges:
            if blocks:
                punch_hole(unit.fd, lba * BLOCK, blocks * BLOCK)

    def _write_same(self, c: Command) -> None:
        sixteen = c.cdb[0] == 0x93
        flags = c.cdb[1]
        lba, count = (_be(c.cdb, 2, 8), _be(c.cdb, 10, 4)) if sixteen else (_be(c.cdb, 2, 4), _be(c.cdb, 7, 2))
        no_data = sixteen and bool(flags & 0x01)  # NDOB: the block is zeros, nothing transferred
        if flags & 0xE0:
            raise CheckCondition(invalid_field(1))  # WRPROTECT
        if flags & 0x10:
            raise CheckCondition(invalid_field(1))  # ANCHOR
        if flags & 0x06:
            raise CheckCondition(invalid_field(1))  # PBDATA/LBDATA (obsolete)
        if count == 0 or count > MAX_WRITE_SAME_BLOCKS:
            raise CheckCondition(invalid_field(10 if sixteen else 7))  # WSNZ, limit in VPD 0xb0
        unit = c.present()
        if not no_data:
            c.io.need_out(BLOCK)
        unit.ready()
        unit.writable()
        unit.check_range(lba, count)
        block = bytes(BLOCK) if no_data else c.io.out_bytes(BLOCK)
        offset, length = lba * BLOCK, count * BLOCK
        if block.count(0) == BLOCK:
            if flags & 0x08:  # UNMAP, and unmapped blocks read as zeros (LBPRZ)
                punch_hole(unit.fd, offset, length)
            else:
                zero_range(unit.fd, offset, length)
        else:
            fill_range(unit.fd, offset, length, block)

    def _report_opcodes(self, c: Command) -> None:
        options, rctd = c.cdb[2] & 0x07, bool(c.cdb[2] & 0x80)
        opcode, action, allocation = c.cdb[3], _be(c.cdb, 4, 2), _be(c.cdb, 6, 4)
        timeouts = bytes([0x00, 0x0A]) + bytes(10) if rctd else b""
        if options == 0:
            entries = b"".join(
                struct.pack(">BxHxBH", op, sa or 0, (0x02 if rctd else 0) | (sa is not None), len(info.usage))
                + timeouts
                for (op, sa), info in sorted(COMMANDS.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))
            )
            c.io.reply(len(entries).to_bytes(4, "big") + entries, allocation)
            return
        if options not in (1, 2, 3):
            raise CheckCondition(invalid_field(2))
        has_actions = opcode in SERVICE_ACTIONS
        if (options == 1 and has_actions) or (options == 2 and not has_actions):
            raise CheckCondition(invalid_field(2))
        info = COMMANDS.get((opcode, action if has_actions else None))
        if info is None:
            reply = bytes([0, 0x01, 0, 0])  # not supported
        else:
            flags = (0x80 if rctd else 0) | 0x03  # CTDP, supported per standard
            reply = bytes([0, flags]) + len(info.usage).to_bytes(2, "big") + info.usage + timeouts
        c.io.reply(reply, allocation)


def encode_lun(lun: int) -> bytes:
    """One REPORT LUNS entry: peripheral addressing below 256, flat space above."""
    if lun < 256:
        return bytes([0, lun]) + bytes(6)
    return bytes([0x40 | lun >> 8, lun & 0xFF]) + bytes(6)


# ---- VPD and mode pages --------------------------------------------------------------------


def _vpd_supported(unit: LogicalUnit) -> bytes:
    return bytes(sorted(VPD_PAGES))


def _vpd_serial(unit: LogicalUnit) -> bytes:
    return unit.serial


def _vpd_identification(unit: LogicalUnit) -> bytes:
    t10 = VENDOR + unit.serial
    # code set 2 (ASCII) type 1 (T10 vendor id); code set 1 (binary) type 3 (NAA); both LU
    return bytes([0x02, 0x01, 0x00, len(t10)]) + t10 + bytes([0x01, 0x03, 0x00, len(unit.naa)]) + unit.naa


def _vpd_block_limits(unit: LogicalUnit) -> bytes:
    return struct.pack(
        ">BBHIIIIIIIQ", 0x01, 0, 0, MAX_TRANSFER_BLOCKS, 0, 0, MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS,
        UNMAP_GRANULARITY, 0, MAX_WRITE_SAME_BLOCKS,
    ) + bytes(20)


def _vpd_characteristics(unit: LogicalUnit) -> bytes:
    return struct.pack(">H", 1) + bytes(58)  # medium rotation rate 1: non-rotating


def _vpd_provisioning(unit: LogicalUnit) -> bytes:
    # LBPU, LBPWS, LBPWS10, LBPRZ=1; provisioning type 2 (thin)
    return bytes([0x00, 0xE0 | 0x04, 0x02, 0x00])


VPD_PAGES: dict[int, Callable[[LogicalUnit], bytes]] = {
    0x00: _vpd_supported,
    0x80: _vpd_serial,
    0x83: _vpd_identification,
    0xB0: _vpd_block_limits,
    0xB1: _vpd_characteristics,
    0xB2: _vpd_provisioning,
}


def _caching_page(unit: LogicalUnit, changeable: bool) -> bytes:
    # WCE: writes land in the host page cache; SYNCHRONIZE CACHE makes them durable
    return bytes([0x08, 0x12, 0x00 if changeable else 0x04]) + bytes(17)


def _control_page(unit: LogicalUnit, changeable: bool) -> bytes:
    # fixed-format sense (D_SENSE 0), unrestricted reordering is not claimed (QAM 0)
    return bytes([0x0A, 0x0A]) + bytes(10)


MODE_PAGES: dict[int, Callable[[LogicalUnit, bool], bytes]] = {0x08: _caching_page, 0x0A: _control_page}

SERVICE_ACTIONS = (0x9E, 0xA3)
COMMANDS: dict[tuple[int, int | None], CommandInfo] = {
    (0x00, None): CommandInfo("TEST UNIT READY", ScsiTarget._test_unit_ready, _usage("000000000004")),
    (0x03, None): CommandInfo("REQUEST SENSE", ScsiTarget._request_sense, _usage("03010000ff04")),
    (0x08, None): CommandInfo("READ(6)", ScsiTarget._rw, _usage("081fffffff04")),
    (0x0A, None): CommandInfo("WRITE(6)", ScsiTarget._rw, _usage("0a1fffffff04")),
    (0x12, None): CommandInfo("INQUIRY", ScsiTarget._inquiry, _usage("1201ffffff04")),
    (0x1A, None): CommandInfo("MODE SENSE(6)", ScsiTarget._mode_sense, _usage("1a08ffffff04")),
    (0x1B, None): CommandInfo("START STOP UNIT", ScsiTarget._start_stop, _usage("1b010000f304")),
    (0x25, None): CommandInfo("READ CAPACITY(10)", ScsiTarget._read_capacity10, _usage("2500ffffffff00000104")),
    (0x28, None): CommandInfo("READ(10)", ScsiTarget._rw, _usage("28f8ffffffff00ffff04")),
    (0x2A, None): CommandInfo("WRITE(10)", ScsiTarget._rw, _usage("2af8ffffffff00ffff04")),
    (0x35, None): CommandInfo("SYNCHRONIZE CACHE(10)", ScsiTarget._synchronize_cache, _usage("3502ffffffff00ffff04")),
    (0x41, None): CommandInfo("WRITE SAME(10)", ScsiTarget._write_same, _usage("41f8ffffffff00ffff04")),
    (0x42, None): CommandInfo("UNMAP", ScsiTarget._unmap, _usage("42010000000000ffff04")),
    (0x5A, None): CommandInfo("MODE SENSE(10)", ScsiTarget._mode_sense, _usage("5a18ffff000000ffff04")),
    (0x88, None): CommandInfo("READ(16)", ScsiTarget._rw, _usage("88f8ffffffffffffffffffffffff0004")),
    (0x8A, None): CommandInfo("WRITE(16)", ScsiTarget._rw, _usage("8af8ffffffffffffffffffffffff0004")),
    (0x91, None): CommandInfo("SYNCHRONIZE CACHE(16)", ScsiTarget._synchronize_cache,
                              _usage("9102ffffffffffffffffffffffff0004")),
    (0x93, None): CommandInfo("WRITE SAME(16)", ScsiTarget._write_same, _usage("93f9ffffffffffffffffffffffff0004")),
    (0x9E, 0x10): CommandInfo("READ CAPACITY(16)", ScsiTarget._read_capacity16,
                              _usage("9e1f0000000000000000ffffffff0004"), 0x10),
    (0xA0, None): CommandInfo("REPORT LUNS", ScsiTarget._report_luns, _usage("a000ff000000ffffffff0004")),
    (0xA3, 0x0C): CommandInfo("REPORT SUPPORTED OPERATION CODES", ScsiTarget._report_opcodes,
                              _usage("a31f87ffffffffffffff0004"), 0x0C),
}
