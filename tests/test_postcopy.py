"""Postcopy in our back end, with the test playing QEMU's part (real userfaultfd, real memfds).

The front end hands guest memory over while "listening", gets our mapping addresses back, acks,
and from then on every page the device touches that is not in the memfd yet must arrive as a
userfault on the fd the back end gave at POSTCOPY_ADVISE. The test serves those faults the way
QEMU does for shared memory: it writes the page through its own mapping of the memfd and wakes
the back end with UFFDIO_WAKE. The data must then reach the image exactly; with
--fault no-postcopy-register the back end reads a page that never arrived and that is visible.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest
from conftest import TIMEOUT, serving, wait_for
from test_backend_protocol import (
    AVAIL_GPA,
    BUF_GPA,
    DESC_GPA,
    F_PROTOCOL,
    F_VERSION_1,
    P_MQ,
    P_REPLY_ACK,
    RawFrontEnd,
    T_OUT,
    USED_GPA,
    WRITE,
    our_blk,
    u64,
)

from lab.vhost_user import postcopy
from lab.vhost_user.image import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from lab.virtio.vhost_user import MEM_REGION, U64, Request

REPO = Path(__file__).resolve().parents[1]
P_PAGEFAULT = 8
PAGE = 4096
UFFD_MSG = struct.Struct("<B3xI QQ8x")  # event, pad; pagefault: flags, address, ptid
UFFD_EVENT_PAGEFAULT = 0x12
UFFDIO_WAKE = 0x8010AA02
SOURCE_PAGE = 0x200000  # the data page of the write: "still on the source" when the guest resumes
STATUS_GPA = BUF_GPA + 0x800

needs_root = pytest.mark.skipif(postcopy.probe() is not None, reason=f"userfaultfd unavailable: {postcopy.probe()}")


class FaultServer(threading.Thread):
    """QEMU's fault thread for shared memory: each fault read from the back end's ufd is served
    by placing the page's "source" content through our own mapping, then waking the back end.
    (Only pages nobody has written may fault: placing one overwrites what is there.)"""

    def __init__(self, front: RawFrontEnd, ufd: int, client_base: int, source: dict[int, bytes]) -> None:
        super().__init__(daemon=True)
        self.front, self.ufd, self.base, self.source = front, ufd, client_base, source
        self.faults: list[int] = []  # guest-physical pages, in order
        self._stop_r, self._stop_w = os.pipe()

    def run(self) -> None:
        while True:
            ready, _, _ = select.select([self.ufd, self._stop_r], [], [], TIMEOUT)
            if self._stop_r in ready or not ready:
                return
            try:
                raw = os.read(self.ufd, UFFD_MSG.size)
            except BlockingIOError:
                continue
            event, _, _flags, address = UFFD_MSG.unpack(raw)
            assert event == UFFD_EVENT_PAGEFAULT
            page = (address - self.base) & ~(PAGE - 1)
            self.faults.append(page)
            self.front.mem.write(page, self.source.get(page, bytes(PAGE)))
            fcntl.ioctl(self.ufd, UFFDIO_WAKE, struct.pack("<QQ", address & ~(PAGE - 1), PAGE))

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self.join(TIMEOUT)
        os.close(self._stop_r)
        os.close(self._stop_w)


def postcopy_front_end(socket: str) -> tuple[RawFrontEnd, int, int]:
    """ADVISE, LISTEN, then the postcopy SET_MEM_TABLE exchange and one running ring; returns the
    front end, the back end's ufd and the back end's address of guest-physical 0."""
    front = RawFrontEnd(socket, start=False, protocol=1 << P_MQ | 1 << P_REPLY_ACK | 1 << P_PAGEFAULT)
    for page in (DESC_GPA, AVAIL_GPA, USED_GPA, BUF_GPA):  # the rings arrived before the switch
        front.mem.write(page, bytes(PAGE))
    c = front.conn
    assert u64(c.call(Request.GET_PROTOCOL_FEATURES, reply=True)) & 1 << P_PAGEFAULT
    c.send(Request.POSTCOPY_ADVISE)
    payload, fds = c.expect_reply(Request.POSTCOPY_ADVISE)
    assert payload == b"" and len(fds) == 1
    ufd = fds[0]
    front.fds.append(ufd)
    assert front.acked(Request.POSTCOPY_LISTEN) == 0
    c.send(Request.SET_FEATURES, U64.pack(1 << F_VERSION_1 | 1 << F_PROTOCOL))
    c.send(Request.SET_MEM_TABLE, front.mem_table(), front.mem.fds)  # no NEED_REPLY in postcopy
    reply, reply_fds = c.expect_reply(Request.SET_MEM_TABLE)
    assert not reply_fds and len(reply) == len(front.mem_table())
    gpa, size, client_base, offset = MEM_REGION.unpack_from(reply, 8)
    region = front.mem.regions[0]
    assert (gpa, size, offset) == (region.gpa, region.size, 0)
    assert client_base not in (0, region.qva)  # the back end's own mapping
    c.send(Request.SET_MEM_TABLE, U64.pack(0))  # QEMU's ack: ready for faults
    front.start_ring()
    return front, ufd, client_base


def write_from_missing_page(front: RawFrontEnd) -> None:
    """A blk write of one page whose data page is not in the memfd (punched out: "on the source")."""
    front.mem.write(STATUS_GPA, b"\xff")
    fallocate(front.mem.fds[0], FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, SOURCE_PAGE, PAGE)
    front.request(0, T_OUT, 8, [(SOURCE_PAGE, PAGE, 0), (STATUS_GPA, 1, WRITE)])
    front.publish(0)


@contextlib.contextmanager
def write_served_by_faults(socket: str, data: bytes) -> Iterator[tuple[RawFrontEnd, FaultServer]]:
    """A postcopy front end whose fault server holds `data` as SOURCE_PAGE's content, after a
    blk write of that missing page has completed; both are stopped on leaving."""
    front, ufd, base = postcopy_front_end(socket)
    faults = FaultServer(front, ufd, base, {SOURCE_PAGE: data})
    faults.start()
    try:
        write_from_missing_page(front)
        front.wait_used(1)
        yield front, faults
    finally:
        faults.stop()
        front.close()


def image_page(backend, sector: int) -> bytes:
    with open(backend.image, "rb") as image:
        return os.pread(image.fileno(), PAGE, sector * 512)


@needs_root
def test_device_fault_is_served_by_the_front_end(tmp_path: Path) -> None:
    data = os.urandom(PAGE)
    with serving(our_blk(tmp_path)) as backend, write_served_by_faults(backend.socket, data) as (front, faults):
        assert faults.faults == [SOURCE_PAGE]
        assert front.mem.read(STATUS_GPA, 1) == b"\0"
        assert image_page(backend, 8) == data
        assert front.acked(Request.POSTCOPY_END) == 0
        wait_for(lambda: "postcopy ended: faults=1 requests=1" in backend.log_text(), "the fault count line")


@needs_root
def test_no_postcopy_register_fault_reads_a_page_that_never_arrived(tmp_path: Path) -> None:
    data = os.urandom(PAGE)
    with (serving(our_blk(tmp_path, "--fault", "no-postcopy-register")) as backend,
          write_served_by_faults(backend.socket, data) as (front, faults)):
        assert faults.faults == []  # the front end never heard of the missing page
        assert image_page(backend, 8) == bytes(PAGE)  # so the guest's data is lost
        assert "NOT registered with userfaultfd" in backend.log_text()


@needs_root
def test_listen_is_refused_once_memory_is_mapped(tmp_path: Path) -> None:
    with serving(our_blk(tmp_path)) as backend:
        front = RawFrontEnd(backend.socket, protocol=1 << P_MQ | 1 << P_REPLY_ACK | 1 << P_PAGEFAULT)
        try:
            assert front.acked(Request.POSTCOPY_LISTEN) == 1
            assert "POSTCOPY_LISTEN refused" in backend.log_text()
            backend.check_alive()
        finally:
            front.close()


def test_without_userfaultfd_pagefault_is_not_offered(tmp_path: Path) -> None:
    """As an unprivileged user (vm.unprivileged_userfaultfd=0) the back end says why in one line
    and does not offer PAGEFAULT."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    try:
        with open("/proc/sys/vm/unprivileged_userfaultfd") as knob:
            if knob.read().strip() != "0":
                pytest.skip("unprivileged userfaultfd is allowed on this host")
    except FileNotFoundError:
        pass
    # the code is imported as root, then the process becomes nobody: a checkout in a private
    # directory (mode 0700) is not readable by nobody
    script = (
        "import logging, os, sys; logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
        "from lab.vhost_user import postcopy\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "print(postcopy.probe())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "EPERM" in result.stdout and "not root" in result.stdout, result.stdout


def test_postcopy_requests_need_pagefault(tmp_path: Path) -> None:
    """Without PAGEFAULT negotiated POSTCOPY_* are unsupported requests: answered as failures."""
    with serving(our_blk(tmp_path)) as backend:
        front = RawFrontEnd(backend.socket, start=False)
        try:
            assert front.acked(Request.POSTCOPY_LISTEN) == 1
            backend.check_alive()
        finally:
            front.close()

