"""A raw image file shared by the block devices: open with clear errors, zero-copy transfers
between the image and guest memory (os.preadv/os.pwritev on views, GIL released), holes and
zeroed ranges through fallocate."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from typing import Callable

from lab.errors import LabError
from lab.vhost_user.device import Buffers

IOV_MAX = 1024
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_image(path: str, read_only: bool, unit: int) -> tuple[int, int]:
    """(fd, size) of a raw image whose size is a non-zero multiple of `unit`; LabError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
    except OSError as exc:
        raise LabError(f"cannot open image {path}: {exc.strerror}") from None
    size = os.fstat(fd).st_size
    if size == 0 or size % unit:
        os.close(fd)
        raise LabError(f"image {path} is {size} bytes, not a non-zero multiple of {unit}")
    return fd, size


def transfer(op: Callable[[int, list[memoryview], int], int], fd: int, views: list[memoryview], offset: int) -> None:
    """preadv/pwritev all views at offset, resuming after short transfers."""
    while views:
        batch = views[:IOV_MAX]
        done = op(fd, batch, offset)
        want = sum(len(v) for v in batch)
        if done == want:
            views = views[IOV_MAX:]
        elif done == 0:
            raise OSError(errno.EIO, "unexpected end of image")
        else:
            views = Buffers.slice(views, done, Buffers.total(views) - done)
        offset += done


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate the range; it reads back as zeros."""
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def zero_range(fd: int, offset: int, length: int) -> None:
    """Zero the range and keep it allocated (written zeros where the file system cannot)."""
    try:
        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        fill_range(fd, offset, length, bytes(min(length, _ZERO_CHUNK)))


def fill_range(fd: int, offset: int, length: int, pattern: bytes) -> None:
    """Write `pattern` repeatedly over [offset, offset+length); len(pattern) divides length or
    is at least length."""
    chunk = pattern * max(1, _ZERO_CHUNK // len(pattern))
    while length:
        n = os.pwrite(fd, chunk[: min(length, len(chunk))], offset)
        offset += n
        length -= n
