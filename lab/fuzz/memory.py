"""Guest RAM for the fuzzer: memfd regions with canary guard pages the back end must not touch.

Each region's memfd holds GUARD bytes of canary, the region, GUARD bytes of canary; the memory
table registers only the middle (mmap_offset = GUARD), so a back end that maps or writes
anything beyond what it was given changes a canary. Together with the check that the device
wrote only its used ring and the buffers marked device-writable (rings.py), this is the
"never touches memory outside the mapped regions" property, observed from outside the process.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass

GUARD = 4096
REGIONS = 2
REGION_SIZE = 1 << 20
SIZE = REGIONS * REGION_SIZE


@dataclass
class _Region:
    gpa: int
    fd: int
    mm: mmap.mmap

    @property
    def qva(self) -> int:
        """The address QEMU would send: our mapping of the region's first byte."""
        anchor = ctypes.c_char.from_buffer(self.mm, GUARD)
        try:
            return ctypes.addressof(anchor)
        finally:
            del anchor


class GuardedMemory:
    """REGIONS contiguous regions of REGION_SIZE from guest-physical 0, each between canaries."""

    def __init__(self) -> None:
        self.regions: list[_Region] = []
        self.canary = os.urandom(GUARD)
        try:
            for i in range(REGIONS):
                fd = os.memfd_create(f"fuzz-guest-ram{i}", os.MFD_CLOEXEC)
                self.regions.append(_Region(i * REGION_SIZE, fd, self._map(fd)))
        except BaseException:
            self.close()
            raise

    def _map(self, fd: int) -> mmap.mmap:
        os.ftruncate(fd, REGION_SIZE + 2 * GUARD)
        mm = mmap.mmap(fd, REGION_SIZE + 2 * GUARD, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        mm[:GUARD] = self.canary
        mm[GUARD + REGION_SIZE :] = self.canary
        return mm

    @property
    def fds(self) -> list[int]:
        return [r.fd for r in self.regions]

    def table(self) -> list[tuple[int, int, int, int]]:
        """(gpa, size, userspace address, mmap offset) of every region."""
        return [(r.gpa, REGION_SIZE, r.qva, GUARD) for r in self.regions]

    def qva(self, gpa: int) -> int:
        region = self.regions[gpa // REGION_SIZE]
        return region.qva + gpa - region.gpa

    def write(self, gpa: int, data: bytes) -> None:
        """Bytes at gpa; parts beyond guest memory are dropped (a hostile guest's addresses)."""
        for piece_gpa, start, end in self._pieces(gpa, len(data)):
            region = self.regions[piece_gpa // REGION_SIZE]
            off = GUARD + piece_gpa - region.gpa
            region.mm[off : off + end - start] = data[start:end]

    def read(self, gpa: int, size: int) -> bytes:
        out = bytearray(size)
        for piece_gpa, start, end in self._pieces(gpa, size):
            region = self.regions[piece_gpa // REGION_SIZE]
            off = GUARD + piece_gpa - region.gpa
            out[start:end] = region.mm[off : off + end - start]
        return bytes(out)

    def snapshot(self) -> bytes:
        return b"".join(r.mm[GUARD : GUARD + REGION_SIZE] for r in self.regions)

    def canaries_intact(self) -> bool:
        return all(r.mm[:GUARD] == self.canary and r.mm[GUARD + REGION_SIZE :] == self.canary for r in self.regions)

    def _pieces(self, gpa: int, size: int) -> list[tuple[int, int, int]]:
        """(gpa, data start, data end) of the parts of [gpa, gpa+size) inside guest memory."""
        pieces = []
        pos = 0
        while pos < size and gpa + pos < SIZE:
            here = gpa + pos
            n = min(size - pos, REGION_SIZE - here % REGION_SIZE)
            pieces.append((here, pos, pos + n))
            pos += n
        return pieces

    def close(self) -> None:
        for region in self.regions:
            region.mm.close()
            os.close(region.fd)
        self.regions = []
