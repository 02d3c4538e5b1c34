"""The dirty log QEMU reads during migration: one bit per 4 KiB guest page.

Only this process writes the bitmap (one writer per connection), so a plain read-modify-write
byte OR can only add bits racing QEMU's atomic exchange, never lose one.
"""

from __future__ import annotations

import os

from lab.vhost_user import DeviceBroken
from lab.vhost_user.memory import map_shared, unmap
from lab.vhost_user.protocol import LogBase, require_regular_file

PAGE_SHIFT = 12


class DirtyLog:
    """The log region of SET_LOG_BASE (takes ownership of fd)."""

    def __init__(self, fd: int, base: LogBase) -> None:
        try:
            require_regular_file(fd, "dirty log", base.offset + base.size)
            self._mm, self._view = map_shared(fd, base.offset, base.size)
        finally:
            os.close(fd)
        self._pages = base.size * 8

    def mark(self, gpa: int, length: int) -> None:
        """Set the bits of every page in guest-physical [gpa, gpa+length)."""
        if not length:
            return
        first = gpa >> PAGE_SHIFT
        last = (gpa + length - 1) >> PAGE_SHIFT
        if last >= self._pages:
            raise DeviceBroken(
                f"dirty log of {self._pages} pages cannot record guest address {gpa:#x}+{length:#x}"
            )
        view = self._view
        page = first
        while page <= last:
            if page & 7 == 0 and last - page >= 7:
                view[page >> 3] = 0xFF
                page += 8
            else:
                view[page >> 3] |= 1 << (page & 7)
                page += 1

    def close(self) -> None:
        unmap(self._mm, self._view)
