"""Inflight tracking: the shared region that makes a blk reconnect lossless.

Layout we choose (QEMU only passes the region through), all little endian, per queue q at
offset q * stride with stride = ALIGN_UP(16 + 16 * queue_size, 64):

    header, 16 bytes:  u64 features (0), u16 version (1), u16 desc_num (queue_size),
                       u16 last_batch_head, u16 used_idx
    desc_num entries of 16 bytes: u8 inflight, u8 pad[5], u16 next (unused), u64 counter

On pop: entry[head].counter = ++counter, inflight = 1. On completion (after the used elements
of a batch are written, before used->idx is published) last_batch_head = the batch's last head;
after used->idx is published every entry of the batch gets inflight = 0 and header.used_idx =
used->idx. A crash between publishing used->idx and clearing is detected on reconnect by
header.used_idx != used->idx: the heads in used ring slots [header.used_idx, used->idx) were
completed and are cleared (libvhost-user clears only last_batch_head; a batch needs them all).
Then the remaining inflight entries are resubmitted in counter order and
last_avail = used->idx + their number.
"""

from __future__ import annotations

import fcntl
import os
import struct

from lab.vhost_user import DeviceBroken
from lab.vhost_user.memory import map_shared, unmap
from lab.vhost_user.protocol import Inflight, require_regular_file

HEADER = struct.Struct("<QHHHH")
ENTRY = struct.Struct("<B5xHQ")
COUNTER = struct.Struct("<Q")
VERSION = 1


def queue_stride(queue_size: int) -> int:
    return (HEADER.size + ENTRY.size * queue_size + 63) & ~63


def region_size(num_queues: int, queue_size: int) -> int:
    return num_queues * queue_stride(queue_size)


def create_region(num_queues: int, queue_size: int) -> tuple[int, int]:
    """A fresh sealed memfd with initialised headers; returns (fd, size). The caller owns fd."""
    size = region_size(num_queues, queue_size)
    fd = os.memfd_create("vhost-user-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        stride = queue_stride(queue_size)
        for q in range(num_queues):
            os.pwrite(fd, HEADER.pack(0, VERSION, queue_size, 0, 0), q * stride)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd, size


class InflightQueue:
    """One queue's part of the region."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        _features, version, self.desc_num, _last, _used = HEADER.unpack_from(view)
        if version != VERSION:
            raise DeviceBroken(f"inflight region: version {version}, expected {VERSION}")
        if HEADER.size + ENTRY.size * self.desc_num > len(view):
            raise DeviceBroken(f"inflight region: {self.desc_num} entries do not fit the queue's area")
        self._counter = 0

    def popped(self, head: int) -> None:
        self._counter += 1
        off = HEADER.size + ENTRY.size * head
        self._view[off] = 1
        COUNTER.pack_into(self._view, off + 8, self._counter)

    def batch_written(self, last_head: int) -> None:
        struct.pack_into("<H", self._view, 12, last_head)

    def batch_published(self, heads: list[int], used_idx: int) -> None:
        view = self._view
        for head in heads:
            view[HEADER.size + ENTRY.size * head] = 0
        struct.pack_into("<H", view, 14, used_idx)

    def recover(self, num: int, used_idx: int, used_ids: list[int]) -> list[int]:
        """Heads still inflight after a reconnect, oldest first. used_ids: the heads in used ring
        slots [header.used_idx, used_idx) when the header lags (see the module docstring)."""
        if num > self.desc_num:
            raise DeviceBroken(f"inflight region: queue size {num} exceeds its {self.desc_num} entries")
        view = self._view
        for head in used_ids:
            if head < num:
                view[HEADER.size + ENTRY.size * head] = 0
        struct.pack_into("<H", view, 14, used_idx)
        pending = []
        for head in range(num):
            inflight, _next, counter = ENTRY.unpack_from(view, HEADER.size + ENTRY.size * head)
            if inflight:
                pending.append((counter, head))
            self._counter = max(self._counter, counter)
        pending.sort()
        return [head for _counter, head in pending]

    @property
    def header_used_idx(self) -> int:
        return struct.unpack_from("<H", self._view, 14)[0]

    def release(self) -> None:
        self._view.release()


class InflightRegion:
    """The region QEMU hands back with SET_INFLIGHT_FD (takes ownership of fd)."""

    def __init__(self, fd: int, spec: Inflight) -> None:
        try:
            expected = region_size(spec.num_queues, spec.queue_size)
            if spec.mmap_size != expected:
                raise DeviceBroken(
                    f"inflight region: size {spec.mmap_size} does not match {spec.num_queues} queues "
                    f"of {spec.queue_size} ({expected})"
                )
            require_regular_file(fd, "inflight region", spec.mmap_offset + spec.mmap_size)
            self._mm, self._view = map_shared(fd, spec.mmap_offset, spec.mmap_size)
        finally:
            os.close(fd)
        stride = queue_stride(spec.queue_size)
        self.queues: list[InflightQueue] = []
        try:
            for q in range(spec.num_queues):
                self.queues.append(InflightQueue(self._view[q * stride : (q + 1) * stride]))
        except DeviceBroken:
            self.close()
            raise

    def queue(self, index: int) -> InflightQueue | None:
        return self.queues[index] if index < len(self.queues) else None

    def close(self) -> None:
        for q in self.queues:
            q.release()
        self.queues = []
        unmap(self._mm, self._view)
