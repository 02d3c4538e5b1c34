"""virtio-blk on a raw image file.

Data moves between the image and guest memory with os.preadv/os.pwritev on views of guest
memory: no copies, and the GIL is released during the I/O.
"""

from __future__ import annotations

import logging
import os
import struct

from lab.errors import LabError
from lab.vhost_user import DeviceBroken
from lab.vhost_user.device import Buffers, ConfigRejected, Device
from lab.vhost_user.image import open_image, punch_hole, transfer, zero_range

log = logging.getLogger(__name__)

SECTOR = 512
HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
ID_BYTES = 20
WZ_F_UNMAP = 1

F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH, F_CONFIG_WCE, F_MQ, F_DISCARD, F_WRITE_ZEROES = 2, 5, 6, 9, 11, 12, 13, 14

SEG_MAX = 126  # Linux chains seg_max + 2 descriptors; fits QEMU's default queue size of 128
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment
MAX_DISCARD_SEG = 16
WCE_OFFSET = 32
CONFIG = struct.Struct("<QIIHBBIBBHIBxHIIIIIBxxx")


class BlkDevice(Device):
    has_config = True
    tracks_inflight = True

    def __init__(self, image: str, num_queues: int = 1, read_only: bool = False, serial: str = "") -> None:
        if num_queues < 1 or num_queues > 256:
            raise LabError(f"queue count {num_queues} is outside 1..256")
        if len(serial.encode()) > ID_BYTES:
            raise LabError(f"serial {serial!r} is longer than {ID_BYTES} bytes")
        self._fd, size = open_image(image, read_only, SECTOR)
        self.num_queues = num_queues
        self.read_only = read_only
        self.sectors = size // SECTOR
        self.serial = serial.encode()
        self.writeback = True

    def features(self) -> int:
        bits = [F_SEG_MAX, F_BLK_SIZE, F_FLUSH, F_CONFIG_WCE, F_MQ, F_DISCARD, F_WRITE_ZEROES]
        if self.read_only:
            bits.append(F_RO)
        return sum(1 << b for b in bits)

    def config(self) -> bytes:
        return CONFIG.pack(
            self.sectors, 0, SEG_MAX, 0, 0, 0, SECTOR, 0, 0, 0, 0, int(self.writeback), self.num_queues,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1,
        )

    def get_config(self, offset: int, size: int) -> bytes:
        if offset + size > 256:
            raise ConfigRejected(f"config read {offset}+{size} beyond 256 bytes")
        space = self.config().ljust(256, b"\0")
        return space[offset : offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        if offset != WCE_OFFSET or len(data) != 1 or data[0] > 1:
            raise ConfigRejected(f"only the wce byte (offset {WCE_OFFSET}) is writable")
        self.writeback = bool(data[0])
        log.info("write cache %s", "enabled" if self.writeback else "disabled (write-through)")

    # ---- requests ------------------------------------------------------------------------

    def handle(self, queue: int, request: Buffers) -> int:
        readable, writable = request.readable, request.writable
        head = readable[0] if readable and len(readable[0]) >= HEADER.size else None
        header = bytes(head[: HEADER.size]) if head is not None else Buffers.gather(readable, 0, HEADER.size)
        if len(header) < HEADER.size:
            raise DeviceBroken(f"blk request header is {len(header)} bytes, needs {HEADER.size}")
        wtotal = Buffers.total(writable)
        if wtotal < 1:
            raise DeviceBroken("blk request has no writable status byte")
        rtype, _reserved, sector = HEADER.unpack(header)
        data_in = wtotal - 1
        try:
            status = self._dispatch(rtype, sector, readable, writable, data_in)
        except OSError as exc:
            log.warning("blk request type %d sector %d failed: %s", rtype, sector, exc)
            status = S_IOERR
        writable[-1][-1] = status  # descriptors are never empty, so this is the chain's last byte
        # The used length covers the whole writable part, as QEMU's virtio-blk reports it: the
        # status byte sits at its very end, and the dirty log records writes up to the used
        # length, so anything shorter (an error, a short GET_ID) would leave the status unlogged.
        return wtotal

    def _in_range(self, sector: int, nbytes: int) -> bool:
        return nbytes % SECTOR == 0 and sector + nbytes // SECTOR <= self.sectors

    def _dispatch(
        self, rtype: int, sector: int, readable: list[memoryview], writable: list[memoryview], data_in: int
    ) -> int:
        if rtype == T_IN:
            if not self._in_range(sector, data_in):
                return S_IOERR
            transfer(os.preadv, self._fd, Buffers.slice(writable, 0, data_in), sector * SECTOR)
            return S_OK
        if rtype == T_OUT:
            data = Buffers.slice(readable, HEADER.size, Buffers.total(readable) - HEADER.size)
            nbytes = Buffers.total(data)
            if self.read_only or not self._in_range(sector, nbytes):
                return S_IOERR
            transfer(os.pwritev, self._fd, data, sector * SECTOR)
            if not self.writeback:
                os.fdatasync(self._fd)
            return S_OK
        if rtype == T_FLUSH:
            if not self.read_only:
                os.fdatasync(self._fd)
            return S_OK
        if rtype == T_GET_ID:
            n = min(ID_BYTES, data_in)
            Buffers.scatter(writable, 0, self.serial.ljust(ID_BYTES, b"\0")[:n])
            return S_OK
        if rtype in (T_DISCARD, T_WRITE_ZEROES):
            return self._ranges(rtype, readable)
        return S_UNSUPP

    def _ranges(self, rtype: int, readable: list[memoryview]) -> int:
        payload = Buffers.gather(readable, HEADER.size, Buffers.total(readable) - HEADER.size)
        if not payload or len(payload) % SEGMENT.size or len(payload) // SEGMENT.size > MAX_DISCARD_SEG:
            return S_IOERR
        segments = [SEGMENT.unpack_from(payload, i) for i in range(0, len(payload), SEGMENT.size)]
        for sector, count, flags in segments:
            if flags & ~WZ_F_UNMAP or (rtype == T_DISCARD and flags):
                return S_UNSUPP
            if count > MAX_DISCARD_SECTORS or sector + count > self.sectors:
                return S_IOERR
        if self.read_only:
            return S_IOERR
        for sector, count, flags in segments:
            offset, length = sector * SECTOR, count * SECTOR
            if rtype == T_DISCARD or flags & WZ_F_UNMAP:
                punch_hole(self._fd, offset, length)
            else:
                zero_range(self._fd, offset, length)
        if not self.writeback:
            os.fdatasync(self._fd)
        return S_OK

    def flush(self) -> None:
        if not self.read_only:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
