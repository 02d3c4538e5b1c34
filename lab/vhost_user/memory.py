"""The front end's memory table: each region's fd mapped once, addresses translated to views.

Guest-physical addresses (descriptor buffers) and QEMU virtual addresses (ring addresses) are
translated to memoryviews that are bounds-checked against the regions; a buffer that spans
adjacent regions comes back as several views. Nothing here copies guest memory.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import mmap
import os
from dataclasses import dataclass

from lab.vhost_user import DeviceBroken
from lab.vhost_user.protocol import MemoryRegion, require_regular_file

log = logging.getLogger(__name__)


def map_shared(fd: int, offset: int, size: int) -> tuple[mmap.mmap, memoryview]:
    """Map [offset, offset+size) of fd read-write and shared; mmap wants a page-aligned offset."""
    aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        mm = mmap.mmap(fd, size + offset - aligned, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned)
    except (OSError, ValueError, OverflowError) as exc:
        raise DeviceBroken(f"cannot map {size:#x} bytes at offset {offset:#x}: {exc}") from None
    view = memoryview(mm)[offset - aligned :]
    return mm, view


def address_of(view: memoryview) -> int:
    """The address of a writable view's first byte (views of guest memory are writable)."""
    anchor = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # releases the export at once, so the mapping can still be closed


def unmap(mm: mmap.mmap, *views: memoryview) -> None:
    """Release views and unmap; a view still exported elsewhere (a traceback holding a frame)
    delays the unmap until the garbage collector frees it."""
    for view in views:
        view.release()
    try:
        mm.close()
    except BufferError:
        gc.collect()
        try:
            mm.close()
        except BufferError:
            log.warning("a view of guest memory is still referenced; unmapping when it is freed")


@dataclass
class _Mapped:
    region: MemoryRegion
    mm: mmap.mmap
    view: memoryview


class GuestMemory:
    """The mapped regions of one SET_MEM_TABLE. Takes ownership of the fds (closed at once:
    the mapping keeps the memory alive)."""

    def __init__(self, regions: tuple[MemoryRegion, ...], fds: list[int]) -> None:
        self._mapped: list[_Mapped] = []
        try:
            for region, fd in zip(regions, fds, strict=True):
                require_regular_file(fd, f"region at {region.gpa:#x}", region.offset + region.size)
                mm, view = map_shared(fd, region.offset, region.size)
                self._mapped.append(_Mapped(region, mm, view))
        except BaseException:
            self.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        self._mapped.sort(key=lambda m: m.region.gpa)
        self._by_uaddr = sorted(self._mapped, key=lambda m: m.region.uaddr)

    @property
    def regions(self) -> list[MemoryRegion]:
        return [m.region for m in self._mapped]

    def host_address(self, gpa: int) -> int:
        """Where the region starting at guest-physical `gpa` is mapped in this process."""
        for m in self._mapped:
            if m.region.gpa == gpa:
                return address_of(m.view)
        raise DeviceBroken(f"no memory region starts at guest address {gpa:#x}")

    def mappings(self) -> list[tuple[int, int]]:
        """(page-aligned address, length) of every mapping, for madvise and userfaultfd."""
        spans = []
        for m in self._mapped:
            with memoryview(m.mm) as whole:
                spans.append((address_of(whole), len(m.mm)))
        return spans

    def views(self, gpa: int, length: int) -> list[memoryview]:
        """Views covering guest-physical [gpa, gpa+length), split where regions meet."""
        out = []
        while length:
            for m in self._mapped:
                start = gpa - m.region.gpa
                if 0 <= start < m.region.size:
                    n = min(length, m.region.size - start)
                    out.append(m.view[start : start + n])
                    gpa += n
                    length -= n
                    break
            else:
                raise DeviceBroken(f"guest address {gpa:#x} (+{length:#x}) is outside guest memory")
        return out

    def contiguous(self, gpa: int, length: int) -> memoryview:
        """One view for a structure that must not straddle regions (an indirect table)."""
        for m in self._mapped:
            start = gpa - m.region.gpa
            if 0 <= start and start + length <= m.region.size:
                return m.view[start : start + length]
        raise DeviceBroken(f"guest range {gpa:#x}+{length:#x} is not inside one memory region")

    def qva_view(self, qva: int, length: int) -> memoryview:
        """One view for a ring given by its QEMU virtual address."""
        for m in self._by_uaddr:
            start = qva - m.region.uaddr
            if 0 <= start and start + length <= m.region.size:
                return m.view[start : start + length]
        raise DeviceBroken(f"ring at user address {qva:#x}+{length:#x} is not inside one memory region")

    def close(self) -> None:
        mapped, self._mapped = self._mapped, []
        self._by_uaddr = []
        for m in mapped:
            unmap(m.mm, m.view)
