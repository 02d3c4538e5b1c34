"""Dirty logging in our back end, read back the way QEMU reads it (real memfds, real socket).

Every byte the device writes into guest memory must show in the log: data buffers in chain
order up to the used length, the status byte at the end of the chain even when the request
failed, the used element and used->idx. A log too small for an address breaks the device
(never a write outside the log), a second SET_LOG_BASE replaces the log at once, and the reply
to GET_VRING_BASE comes only after every popped request is completed and logged.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path

from conftest import serving, wait_for
from test_backend_protocol import (
    F_LOG_ALL,
    IMAGE_SIZE,
    MEM_SIZE,
    P_LOG_SHMFD,
    P_MQ,
    P_REPLY_ACK,
    T_IN,
    USED_GPA,
    WRITE,
    RawFrontEnd,
    our_blk,
    u64,
)

from lab.virtio.vhost_user import VRING_STATE, Request

PAGE = 4096
LOG_SIZE = MEM_SIZE // PAGE // 8  # one bit per page of guest memory
STATUS_GPA = 0x9000  # a page of its own: nothing else the device writes is there


def make_log(size: int = LOG_SIZE) -> int:
    fd = os.memfd_create("dirty-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def dirty_pages(log_fd: int) -> set[int]:
    """Guest-physical addresses of the pages marked in the log (little-endian bit order)."""
    data = os.pread(log_fd, os.fstat(log_fd).st_size, 0)
    return {(i * 8 + b) * PAGE for i, byte in enumerate(data) if byte for b in range(8) if byte >> b & 1}


@contextlib.contextmanager
def logging_front_end(socket: str, log_size: int = LOG_SIZE) -> Iterator[tuple[RawFrontEnd, int]]:
    """A front end whose ring runs with logging on (the order QEMU uses when migration starts)."""
    front = RawFrontEnd(socket, features=1 << F_LOG_ALL, protocol=1 << P_MQ | 1 << P_REPLY_ACK | 1 << P_LOG_SHMFD)
    log_fd = make_log(log_size)
    try:
        assert u64(front.conn.call(Request.SET_LOG_BASE, struct.pack("<QQ", log_size, 0), [log_fd], reply=True)) == 0
        assert front.acked(Request.SET_VRING_ADDR, front.ring_addr(flags=1)) == 0
        yield front, log_fd
    finally:
        os.close(log_fd)
        front.close()


def test_every_written_byte_is_logged_in_chain_order(tmp_path: Path) -> None:
    data_pages = [0x100000, 0x7000, 0x300000]  # out of address order: the chain's order counts
    with serving(our_blk(tmp_path)) as backend, logging_front_end(backend.socket) as (front, log_fd):
        front.request(0, T_IN, 0, [(gpa, PAGE, WRITE) for gpa in data_pages] + [(STATUS_GPA, 1, WRITE)])
        front.publish(0)
        front.wait_used(1)
        assert dirty_pages(log_fd) == {*data_pages, STATUS_GPA, USED_GPA}


def test_failed_request_logs_its_status_byte(tmp_path: Path) -> None:
    """A read past the end of the disk writes only the status byte, at the chain's far end."""
    beyond = IMAGE_SIZE // 512
    with serving(our_blk(tmp_path)) as backend, logging_front_end(backend.socket) as (front, log_fd):
        front.request(0, T_IN, beyond, [(0x100000, PAGE, WRITE), (STATUS_GPA, 1, WRITE)])
        front.publish(0)
        front.wait_used(1)
        assert front.mem.read(STATUS_GPA, 1) == b"\1"  # VIRTIO_BLK_S_IOERR
        assert STATUS_GPA in dirty_pages(log_fd)


def test_second_log_base_replaces_the_log(tmp_path: Path) -> None:
    with serving(our_blk(tmp_path)) as backend, logging_front_end(backend.socket) as (front, old_fd):
        bigger = make_log(2 * LOG_SIZE)  # QEMU resizes the log when guest memory grows
        try:
            reply = front.conn.call(Request.SET_LOG_BASE, struct.pack("<QQ", 2 * LOG_SIZE, 0), [bigger], reply=True)
            assert u64(reply) == 0
            front.request(0, T_IN, 0, [(0x100000, PAGE, WRITE), (STATUS_GPA, 1, WRITE)])
            front.publish(0)
            front.wait_used(1)
            assert dirty_pages(bigger) == {0x100000, STATUS_GPA, USED_GPA}
            assert dirty_pages(old_fd) == set()
        finally:
            os.close(bigger)


def test_log_too_small_breaks_the_device_not_the_process(tmp_path: Path) -> None:
    far = MEM_SIZE - PAGE  # the last page: the log below covers only the first half of memory
    with serving(our_blk(tmp_path)) as backend:
        with logging_front_end(backend.socket, LOG_SIZE // 2) as (front, log_fd):
            front.request(0, T_IN, 0, [(far, PAGE, WRITE), (STATUS_GPA, 1, WRITE)])
            front.publish(0)
            wait_for(lambda: backend.broken_lines(), "the 'device broken' line")
            assert "cannot record guest address" in backend.broken_lines()[0]
            assert os.pread(log_fd, LOG_SIZE // 2, 0).count(0) == LOG_SIZE // 2  # nothing past it either
        backend.check_alive()


def test_get_vring_base_answers_after_the_popped_requests_are_logged(tmp_path: Path) -> None:
    with serving(our_blk(tmp_path)) as backend, logging_front_end(backend.socket) as (front, log_fd):
        front.request(0, T_IN, 0, [(0x100000, PAGE, WRITE), (STATUS_GPA, 1, WRITE)])
        front.publish(0)
        base = front.conn.call(Request.GET_VRING_BASE, VRING_STATE.pack(0, 0), reply=True)
        index, last_avail = VRING_STATE.unpack(base)
        # whatever the back end popped before stopping is completed and logged; the rest is
        # left in the avail ring for the destination (last_avail says where it resumes)
        assert front.used_idx() == last_avail
        if last_avail:
            assert {0x100000, STATUS_GPA, USED_GPA} <= dirty_pages(log_fd)
