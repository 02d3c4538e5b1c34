"""Helpers shared by the driver's two memory managers (hugepage DMA memory, memfd guest RAM)."""

from __future__ import annotations

import ctypes
import mmap


def mapping_address(mapping: mmap.mmap) -> int:
    """This process's virtual address of `mapping`."""
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # the buffer export would keep the mapping from ever closing


def coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted [start, end) ranges with adjacent ones joined: a free list after a release."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged
