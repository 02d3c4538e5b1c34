"""DMA memory inside a guest without an IOMMU: 2 MiB hugepages and their physical addresses.

The device sees guest-physical addresses. Hugepages are never moved or swapped by the kernel,
so the physical address of each one, read once from /proc/self/pagemap (root only: PFNs read
as 0 otherwise), stays valid while the mapping lives. Pages come from an anonymous shared
MAP_HUGETLB mapping (shared: a fork never turns them copy-on-write), so everything returns to
the kernel's pool when the mapping or the process goes away.

Allocations are physically contiguous (alloc: rings, headers) or virtually contiguous with a
list of physical segments, split wherever two hugepages are not physically adjacent
(alloc_sg: data buffers of any size).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

from . import VirtioError
from .mapping import coalesce, mapping_address
from .ring import align_up
from .transport import DmaBuffer

HUGEPAGE = 2 << 20
PAGE = 4096
MAP_HUGETLB = 0x40000  # not exported by Python's mmap module
_PFN_MASK = (1 << 55) - 1
_PRESENT = 1 << 63
_SYSFS = "/sys/kernel/mm/hugepages/hugepages-2048kB"
_NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


class DmaError(VirtioError):
    """Hugepage memory is missing, exhausted or unusable."""


@dataclass(frozen=True, slots=True)
class SgBuffer:
    """Virtually contiguous memory the device reaches through `segments` (address, length)."""

    view: memoryview
    segments: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        return len(self.view)

    def slice(self, start: int, length: int) -> SgBuffer:
        """[start, start+length) of this buffer, with its own segment list."""
        pieces = []
        skip, left = start, length
        for addr, size in self.segments:
            if skip >= size:
                skip -= size
                continue
            take = min(size - skip, left)
            pieces.append((addr + skip, take))
            left -= take
            skip = 0
            if not left:
                break
        return SgBuffer(self.view[start : start + length], tuple(pieces))


def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read())


def free_hugepages() -> int:
    try:
        return _read_int(f"{_SYSFS}/free_hugepages")
    except FileNotFoundError:
        raise DmaError("this kernel has no 2 MiB hugepages (CONFIG_HUGETLBFS off?)") from None


class HugepageReservation:
    """Makes sure `pages` free hugepages exist, growing the pool at run time if needed;
    release() gives back what was added (pages still mapped are freed by the kernel later)."""

    def __init__(self, pages: int) -> None:
        self.added = 0
        missing = pages - free_hugepages()
        if missing <= 0:
            return
        total = _read_int(_NR_HUGEPAGES)
        try:
            with open(_NR_HUGEPAGES, "w") as f:
                f.write(str(total + missing))
        except OSError as exc:
            raise DmaError(f"{pages} free hugepages needed, cannot reserve more: {exc.strerror}") from None
        self.added = _read_int(_NR_HUGEPAGES) - total
        if free_hugepages() < pages:
            self.release()
            raise DmaError(
                f"{pages} free 2 MiB hugepages needed, only {free_hugepages()} available "
                "(reserve them with hugepages=N on the kernel command line)"
            )

    def release(self) -> None:
        if self.added:
            total = _read_int(_NR_HUGEPAGES)
            with open(_NR_HUGEPAGES, "w") as f:
                f.write(str(max(total - self.added, 0)))
            self.added = 0


def physical_address(pagemap_fd: int, virtual: int) -> int:
    """The physical address behind a touched virtual address of this process."""
    entry = struct.unpack("<Q", os.pread(pagemap_fd, 8, virtual // PAGE * 8))[0]
    pfn = entry & _PFN_MASK
    if not entry & _PRESENT:
        raise DmaError(f"page at {virtual:#x} is not present")
    if pfn == 0:
        raise DmaError("/proc/self/pagemap hides physical addresses: run as root")
    return pfn * PAGE + virtual % PAGE


class DmaMemory:
    """`pages` hugepages; alloc/alloc_sg carve them up, free returns pieces, close releases all."""

    def __init__(self, pages: int) -> None:
        if pages < 1:
            raise DmaError(f"{pages} hugepages: at least one is needed")
        self.pages = pages
        self.size = pages * HUGEPAGE
        self._reservation = HugepageReservation(pages)
        try:
            self._map = mmap.mmap(-1, self.size, flags=mmap.MAP_SHARED | MAP_HUGETLB)
        except OSError as exc:
            self._reservation.release()
            raise DmaError(f"cannot map {pages} hugepages: {exc.strerror}") from None
        self._view = memoryview(self._map)
        try:
            self._base = mapping_address(self._map)
            self.physical = self._resolve()
        except BaseException:
            self.close()
            raise
        # extents: (start offset, end offset) of physically contiguous stretches
        self.extents: list[tuple[int, int]] = []
        for i, phys in enumerate(self.physical):
            if self.extents and self.physical[i - 1] + HUGEPAGE == phys:
                self.extents[-1] = (self.extents[-1][0], (i + 1) * HUGEPAGE)
            else:
                self.extents.append((i * HUGEPAGE, (i + 1) * HUGEPAGE))
        self._free: list[tuple[int, int]] = [(0, self.size)]
        self._used: dict[int, tuple[int, int]] = {}  # first device address -> (offset, size)

    def _resolve(self) -> list[int]:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            out = []
            for i in range(self.pages):
                self._view[i * HUGEPAGE] = 0  # fault the page in before asking where it is
                phys = physical_address(fd, self._base + i * HUGEPAGE)
                if phys % HUGEPAGE:
                    raise DmaError(f"hugepage {i} at physical {phys:#x} is not 2 MiB aligned")
                out.append(phys)
            return out
        finally:
            os.close(fd)

    def address(self, offset: int) -> int:
        return self.physical[offset // HUGEPAGE] + offset % HUGEPAGE

    def segments(self, offset: int, size: int) -> tuple[tuple[int, int], ...]:
        """(device address, length) pieces of [offset, offset+size), merged where contiguous."""
        out: list[tuple[int, int]] = []
        end = offset + size
        while offset < end:
            piece = min(end, (offset // HUGEPAGE + 1) * HUGEPAGE) - offset
            addr = self.address(offset)
            if out and out[-1][0] + out[-1][1] == addr:
                out[-1] = (out[-1][0], out[-1][1] + piece)
            else:
                out.append((addr, piece))
            offset += piece
        return tuple(out)

    def alloc(self, size: int, align: int = 64) -> DmaBuffer:
        """Physically contiguous, zeroed memory (at most one extent of adjacent hugepages)."""
        offset = self._take(size, align, contiguous=True)
        return DmaBuffer(self.address(offset), self._view[offset : offset + size])

    def alloc_sg(self, size: int, align: int = 64) -> SgBuffer:
        """Zeroed memory that may span hugepages that are not physically adjacent."""
        offset = self._take(size, align, contiguous=False)
        return SgBuffer(self._view[offset : offset + size], self.segments(offset, size))

    def free(self, buffer: DmaBuffer | SgBuffer) -> None:
        key = buffer.addr if isinstance(buffer, DmaBuffer) else buffer.segments[0][0]
        offset, size = self._used.pop(key, (None, 0))
        if offset is None:
            raise DmaError(f"DMA memory at {key:#x} was not allocated here")
        self._free = coalesce([*self._free, (offset, offset + size)])

    def close(self) -> None:
        self._used.clear()
        self._free = []
        view = getattr(self, "_view", None)
        if view is not None:
            view.release()
        try:
            self._map.close()
        except BufferError:
            pass  # buffers handed out are still referenced; the mapping ends with them or the process
        except AttributeError:
            pass
        self._reservation.release()

    def _take(self, size: int, align: int, contiguous: bool) -> int:
        if size <= 0:
            raise DmaError(f"cannot allocate {size} bytes of DMA memory")
        for index, (start, end) in enumerate(self._free):
            offset = self._fit(start, end, size, align, contiguous)
            if offset is None:
                continue
            self._free[index : index + 1] = [(s, e) for s, e in ((start, offset), (offset + size, end)) if e > s]
            self._view[offset : offset + size] = bytes(size)
            self._used[self.address(offset)] = (offset, size)
            return offset
        kind = "physically contiguous " if contiguous else ""
        raise DmaError(
            f"no free {kind}{size} B of DMA memory in {self.pages} hugepages "
            f"(largest contiguous stretch {max(e - s for s, e in self.extents)} B): use more hugepages"
        )

    def _fit(self, start: int, end: int, size: int, align: int, contiguous: bool) -> int | None:
        offset = align_up(start, align)
        if not contiguous:
            return offset if offset + size <= end else None
        for ext_start, ext_end in self.extents:
            if ext_end <= offset:
                continue
            candidate = align_up(max(offset, ext_start), align)
            if candidate + size <= min(end, ext_end):
                return candidate
            if ext_start >= end:
                break
        return None
