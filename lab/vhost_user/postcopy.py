"""Postcopy for the back end: userfaultfd through ctypes, and counting the faults the device takes.

In postcopy the destination guest runs before all of its RAM has arrived. Our mapping of guest
memory is registered with a userfaultfd (MISSING mode) whose other end QEMU holds: a page the
device touches before it arrived blocks this process in the kernel, QEMU reads the fault from the
shared fd, fetches the page from the source, places it in its own mapping of the same memfd and
wakes us with UFFDIO_WAKE. Nothing here reads the fd (that would steal QEMU's fault messages).

Fault counting: the fd is QEMU's to read, so the faults are counted on our side of the access:
before a request's buffers are touched, mincore() tells which of their pages are not yet in the
memfd's page cache; each such page is one fault (a page arriving between the check and the
access is counted without having blocked: a small overcount, never an undercount).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import struct
from dataclasses import dataclass

from lab.vhost_user.memory import address_of

log = logging.getLogger(__name__)

SYS_USERFAULTFD = 323  # x86_64
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_REGISTER_MODE_MISSING = 1
UFFDIO_COPY_BIT = 1 << 0x03  # _UFFDIO_COPY in the ioctls mask UFFDIO_REGISTER returns
UFFD_FEATURE_MISSING_SHMEM = 0x20
UFFDIO_API_ARG = struct.Struct("<QQQ")  # api, features, ioctls
UFFDIO_REGISTER_ARG = struct.Struct("<QQQQ")  # range.start, range.len, mode, ioctls
MADV_DONTNEED = 4
PAGE = os.sysconf("SC_PAGE_SIZE")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


class PostcopyError(Exception):
    """userfaultfd cannot be used (the reason is the message)."""


def _errno_text(err: int) -> str:
    return f"{errno.errorcode.get(err, err)} ({os.strerror(err)})"


def open_userfaultfd() -> int:
    """A userfaultfd (O_CLOEXEC|O_NONBLOCK) after the UFFDIO_API handshake; it handles faults
    from kernel accesses too (preadv into guest memory), so it is never user-mode-only."""
    fd = _libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        err = ctypes.get_errno()
        hint = " (not root and vm.unprivileged_userfaultfd=0)" if err == errno.EPERM else ""
        raise PostcopyError(f"userfaultfd: {_errno_text(err)}{hint}")
    try:
        arg = bytearray(UFFDIO_API_ARG.pack(UFFD_API, 0, 0))
        try:
            fcntl.ioctl(fd, UFFDIO_API, arg)
        except OSError as exc:
            raise PostcopyError(f"UFFDIO_API: {_errno_text(exc.errno)}") from None
        _api, features, _ioctls = UFFDIO_API_ARG.unpack(arg)
        if not features & UFFD_FEATURE_MISSING_SHMEM:
            raise PostcopyError("the kernel's userfaultfd cannot handle shared memory (no MISSING_SHMEM)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def probe() -> str | None:
    """None when postcopy can work in this process, else why not (one line)."""
    try:
        os.close(open_userfaultfd())
    except PostcopyError as exc:
        return str(exc)
    return None


def register_missing(ufd: int, address: int, length: int) -> None:
    """Drop our page table entries for the range and register it in MISSING mode, so every access
    to a page not in the memfd yet waits for QEMU to place it."""
    if _libc.madvise(address, length, MADV_DONTNEED) != 0:
        raise PostcopyError(f"madvise(DONTNEED) at {address:#x}+{length:#x}: {_errno_text(ctypes.get_errno())}")
    arg = bytearray(UFFDIO_REGISTER_ARG.pack(address, length, UFFDIO_REGISTER_MODE_MISSING, 0))
    try:
        fcntl.ioctl(ufd, UFFDIO_REGISTER, arg)
    except OSError as exc:
        raise PostcopyError(f"UFFDIO_REGISTER at {address:#x}+{length:#x}: {_errno_text(exc.errno)}") from None
    ioctls = UFFDIO_REGISTER_ARG.unpack(arg)[3]
    if not ioctls & UFFDIO_COPY_BIT:
        raise PostcopyError(f"UFFDIO_REGISTER at {address:#x}: the range does not support UFFDIO_COPY")


def missing_pages(view: memoryview) -> int:
    """How many pages under `view` are not in the page cache yet (would fault)."""
    start = address_of(view)
    first = start - start % PAGE
    pages = (start + len(view) - first + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * pages)()
    if _libc.mincore(first, pages * PAGE, vec) != 0:
        return 0  # not a mapping mincore understands: nothing to count
    return sum(1 for resident in vec if not resident & 1)


@dataclass
class FaultCount:
    """Device faults during one postcopy phase."""

    faults: int = 0
    requests: int = 0  # requests that took at least one fault

    def count(self, views: list[memoryview]) -> None:
        missing = sum(missing_pages(v) for v in views)
        if missing:
            if not self.faults:
                log.info("postcopy: first device fault (a page the device needed had not arrived)")
            self.faults += missing
            self.requests += 1
