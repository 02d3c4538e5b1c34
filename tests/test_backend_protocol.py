"""Our vhost-user back end against hostile front ends and guests (no QEMU, real sockets and memfds).

One back-end process serves every case in turn, as a daemon would. Each malformed input must
mark the device broken (one "device broken:" log line, connection closed) while the process
stays alive, the NEXT connection does real verified I/O, and no fd leaks. The messages and rings
are built by hand with the front end's raw wire (lab.virtio.vhost_user), whose constants are an
independent reading of the spec.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from conftest import TIMEOUT, DaemonUnderTest, make_image, serving, wait_for

from lab.virtio.blk import BlkDevice
from lab.virtio.vhost_user import (
    FLAG_NEED_REPLY,
    FLAG_VERSION,
    HEADER,
    INFLIGHT,
    MEM_REGION,
    U64,
    VRING_ADDR,
    VRING_STATE,
    BackendClosed,
    GuestMemory,
    Request,
    VhostUserConnection,
    VhostUserTransport,
)

REPO = Path(__file__).resolve().parents[1]
QUEUES = 2
IMAGE_SIZE = 16 << 20
MEM_SIZE = 16 << 20

F_LOG_ALL, F_INDIRECT, F_PROTOCOL, F_VERSION_1 = 26, 28, 30, 32
P_MQ, P_LOG_SHMFD, P_REPLY_ACK, P_CONFIG, P_INFLIGHT = 0, 1, 3, 9, 12
DESC = struct.Struct("<QIHH")
NEXT, WRITE, INDIRECT = 1, 2, 4
BLK_HEADER = struct.Struct("<IIQ")
T_IN, T_OUT = 0, 1

# Ring layout of the hand-built front end (fits a 256-entry ring).
DESC_GPA, AVAIL_GPA, USED_GPA, BUF_GPA = 0x1000, 0x2000, 0x3000, 0x10000


def our_blk(tmp: Path, *extra: str) -> DaemonUnderTest:
    """`python -m lab backend blk` on a fresh image in `tmp` (not started)."""
    return DaemonUnderTest(kind="ours", socket=str(tmp / "vu.sock"), image=make_image(tmp / "disk.img", IMAGE_SIZE),
                           log=tmp / "backend.log", queues=QUEUES, extra=extra)


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonUnderTest]:
    with serving(our_blk(tmp_path_factory.mktemp("backend"))) as daemon:
        yield daemon


def verified_io(backend: DaemonUnderTest) -> None:
    """A well-behaved front end: write stamped blocks, read them back on both queues."""
    blk = BlkDevice(VhostUserTransport(backend.socket, mem_size=8 << 20, timeout=TIMEOUT), num_queues=QUEUES)
    try:
        for queue in range(QUEUES):
            stamp = os.urandom(16) * 256
            blk.write(64 + 8 * queue, stamp, queue)
            assert blk.read(64 + 8 * queue, 8, queue) == stamp
    finally:
        blk.close()


# ---- a hand-built front end ------------------------------------------------------------------


def u64(data: bytes) -> int:
    return U64.unpack(data)[0]


class RawFrontEnd:
    """Handshake and one ring built by hand, so any field can be corrupted."""

    def __init__(self, path: str, *, size: int = 16, regions: int = 1, features: int = 0, start: bool = True,
                 protocol: int = 1 << P_MQ | 1 << P_REPLY_ACK | 1 << P_CONFIG) -> None:
        self.size = size
        self.mem = GuestMemory(MEM_SIZE, regions)
        self.conn = VhostUserConnection(path, TIMEOUT)
        self.fds: list[int] = []
        self.avail_idx = 0
        c = self.conn
        self.offered = u64(c.call(Request.GET_FEATURES, reply=True))
        offered_protocol = u64(c.call(Request.GET_PROTOCOL_FEATURES, reply=True))
        c.send(Request.SET_PROTOCOL_FEATURES, U64.pack(offered_protocol & protocol))
        c.send(Request.SET_OWNER)
        if start:
            c.send(Request.SET_FEATURES, U64.pack(1 << F_VERSION_1 | 1 << F_PROTOCOL | 1 << F_INDIRECT | features))
            self.acked(Request.SET_MEM_TABLE, self.mem_table(), self.mem.fds)
            self.start_ring()

    def start_ring(self) -> None:
        """Queue 0 at DESC/AVAIL/USED_GPA with a kick and a call eventfd, enabled (memory is mapped)."""
        c = self.conn
        c.send(Request.SET_VRING_NUM, VRING_STATE.pack(0, self.size))
        c.send(Request.SET_VRING_BASE, VRING_STATE.pack(0, 0))
        c.send(Request.SET_VRING_ADDR, self.ring_addr())
        self.kick, self.call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
        self.fds += [self.kick, self.call]
        c.send(Request.SET_VRING_KICK, U64.pack(0), [self.kick])
        c.send(Request.SET_VRING_CALL, U64.pack(0), [self.call])
        c.send(Request.SET_VRING_ENABLE, VRING_STATE.pack(0, 1))

    def acked(self, request: int, payload: bytes = b"", fds=()) -> int:
        return u64(self.conn.call(request, payload, fds, reply=True, flags=FLAG_VERSION | FLAG_NEED_REPLY))

    def mem_table(self, regions=None) -> bytes:
        regions = regions or [(r.gpa, r.size, r.qva, 0) for r in self.mem.regions]
        return VRING_STATE.pack(len(regions), 0) + b"".join(MEM_REGION.pack(*r) for r in regions)

    def ring_addr(self, index: int = 0, flags: int = 0, log: int = USED_GPA) -> bytes:
        q = self.mem.qva
        return VRING_ADDR.pack(index, flags, q(DESC_GPA), q(USED_GPA), q(AVAIL_GPA), log)

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int = DESC_GPA) -> None:
        self.mem.write(table + 16 * i, DESC.pack(addr, length, flags, nxt))

    def publish(self, head: int, advance: int = 1) -> None:
        self.mem.write(AVAIL_GPA + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + advance) & 0xFFFF
        self.mem.write(AVAIL_GPA + 2, struct.pack("<H", self.avail_idx))
        os.eventfd_write(self.kick, 1)

    def used_idx(self) -> int:
        return struct.unpack("<H", self.mem.read(USED_GPA + 2, 2))[0]

    def wait_used(self, n: int) -> None:
        wait_for(lambda: self.used_idx() >= n, f"used idx {n}")

    def request(self, head: int, rtype: int, sector: int, parts: list[tuple[int, int, int]]) -> int:
        """Chain at `head`: the blk header at BUF_GPA, then (addr, len, flags) parts; returns the
        status byte's GPA (the last part's last byte)."""
        self.mem.write(BUF_GPA, BLK_HEADER.pack(rtype, 0, sector))
        chain = [(BUF_GPA, BLK_HEADER.size, 0)] + parts
        for k, (addr, length, flags) in enumerate(chain):
            last = k == len(chain) - 1
            self.desc(head + k, addr, length, flags | (0 if last else NEXT), head + k + 1)
        return chain[-1][0] + chain[-1][1] - 1

    def close(self) -> None:
        self.conn.close()
        for fd in self.fds:
            os.close(fd)
        self.mem.close()


def survived(backend: DaemonUnderTest) -> None:
    backend.check_alive()
    verified_io(backend)
    backend.wait_idle()


@contextlib.contextmanager
def front_end_to_break(backend: DaemonUnderTest, **options: Any) -> Iterator[RawFrontEnd]:
    """A RawFrontEnd whose misdeeds in the with block must break its connection and only that:
    the back end closes it with one "device broken" line and completes nothing, and then
    survived()."""
    before = len(backend.broken_lines())
    front = RawFrontEnd(backend.socket, **options)
    try:
        yield front
        with pytest.raises(BackendClosed):
            front.conn.recv(timeout=TIMEOUT)
        wait_for(lambda: len(backend.broken_lines()) > before, "the 'device broken' log line")
        assert len(backend.broken_lines()) == before + 1, backend.broken_lines()[before:]
        assert front.used_idx() == 0
    finally:
        front.close()
    survived(backend)


# ---- message level ---------------------------------------------------------------------------


def _raw(conn: VhostUserConnection, request: int, flags: int, size: int, payload: bytes, fds=()) -> None:
    """A header that may lie about its payload size."""
    data = HEADER.pack(request, flags, size) + payload
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    conn.sock.sendmsg([data], ancillary)


def _with_memfd(size: int, action: Callable[[int], None]) -> None:
    fd = os.memfd_create("case", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        action(fd)
    finally:
        os.close(fd)


def _region(f: RawFrontEnd, gpa: int, size: int, uaddr: int, offset: int) -> None:
    f.conn.send(Request.SET_MEM_TABLE, f.mem_table([(gpa, size, uaddr, offset)]), f.mem.fds[:1])


def _too_many_fds(f: RawFrontEnd) -> None:
    fds = [os.eventfd(0) for _ in range(12)]
    try:
        f.conn.send(Request.SET_VRING_CALL, U64.pack(0), fds)
    finally:
        for fd in fds:
            os.close(fd)


MESSAGE_CASES: dict[str, Callable[[RawFrontEnd], None]] = {
    "version 2": lambda f: _raw(f.conn, Request.GET_FEATURES, 0x2, 0, b""),
    "reply flag from front end": lambda f: _raw(f.conn, Request.GET_FEATURES, 0x5, 0, b""),
    "payload too short": lambda f: f.conn.send(Request.SET_FEATURES, b"\0" * 4),
    "payload too long": lambda f: f.conn.send(Request.SET_VRING_NUM, b"\0" * 12),
    "payload above maximum": lambda f: _raw(f.conn, Request.SET_MEM_TABLE, 1, 4096, b"\0" * 64),
    "unexpected fd": lambda f: f.conn.send(Request.SET_OWNER, b"", [f.kick]),
    "missing kick fd": lambda f: f.conn.send(Request.SET_VRING_KICK, U64.pack(1)),
    "fd with NOFD": lambda f: f.conn.send(Request.SET_VRING_CALL, U64.pack(0x100), [f.call]),
    "more than 8 fds": _too_many_fds,
    "kick is not an eventfd": lambda f: f.conn.send(Request.SET_VRING_KICK, U64.pack(0), f.mem.fds[:1]),
    "nregions 0": lambda f: f.conn.send(Request.SET_MEM_TABLE, VRING_STATE.pack(0, 0)),
    "nregions 9": lambda f: f.conn.send(Request.SET_MEM_TABLE, f.mem_table([(i << 24, 4096, 0, 0) for i in range(9)])),
    "fd count != nregions": lambda f: f.conn.send(Request.SET_MEM_TABLE, f.mem_table(), []),
    "region size 0": lambda f: _region(f, 0, 0, f.mem.qva(0), 0),
    "gpa overflow": lambda f: _region(f, (1 << 64) - 4096, 8192, f.mem.qva(0), 0),
    "uaddr overflow": lambda f: _region(f, 0, 8192, (1 << 64) - 4096, 0),
    "offset overflow": lambda f: _region(f, 0, 8192, f.mem.qva(0), (1 << 64) - 4096),
    "region beyond its fd": lambda f: _region(f, 0, 2 * MEM_SIZE, f.mem.qva(0), 0),
    "offset beyond its fd": lambda f: _region(f, 0, MEM_SIZE, f.mem.qva(0), 4096),
    "overlapping regions": lambda f: f.conn.send(
        Request.SET_MEM_TABLE, f.mem_table([(0, 8192, 0, 0), (4096, 8192, 0, 0)]), f.mem.fds * 2),
    "NUM index": lambda f: f.conn.send(Request.SET_VRING_NUM, VRING_STATE.pack(QUEUES, 16)),
    "ADDR index": lambda f: f.conn.send(Request.SET_VRING_ADDR, f.ring_addr(index=QUEUES)),
    "BASE index": lambda f: f.conn.send(Request.SET_VRING_BASE, VRING_STATE.pack(QUEUES, 0)),
    "GET_BASE index": lambda f: f.conn.send(Request.GET_VRING_BASE, VRING_STATE.pack(QUEUES, 0)),
    "KICK index": lambda f: f.conn.send(Request.SET_VRING_KICK, U64.pack(QUEUES | 0x100)),
    "CALL index": lambda f: f.conn.send(Request.SET_VRING_CALL, U64.pack(255 | 0x100)),
    "ERR index": lambda f: f.conn.send(Request.SET_VRING_ERR, U64.pack(QUEUES | 0x100)),
    "ENABLE index": lambda f: f.conn.send(Request.SET_VRING_ENABLE, VRING_STATE.pack(QUEUES, 1)),
    "queue size 0": lambda f: f.conn.send(Request.SET_VRING_NUM, VRING_STATE.pack(0, 0)),
    "queue size 3": lambda f: f.conn.send(Request.SET_VRING_NUM, VRING_STATE.pack(0, 3)),
    "queue size 65536": lambda f: f.conn.send(Request.SET_VRING_NUM, VRING_STATE.pack(0, 65536)),
    "base above 16 bits": lambda f: f.conn.send(Request.SET_VRING_BASE, VRING_STATE.pack(0, 70000)),
    "ring outside memory": lambda f: f.conn.send(Request.SET_VRING_ADDR, VRING_ADDR.pack(
        0, 0, f.mem.qva(DESC_GPA), f.mem.qva(0) + MEM_SIZE - 8, f.mem.qva(AVAIL_GPA), 0)),
    "ring misaligned": lambda f: f.conn.send(Request.SET_VRING_ADDR, VRING_ADDR.pack(
        0, 0, f.mem.qva(DESC_GPA) + 8, f.mem.qva(USED_GPA), f.mem.qva(AVAIL_GPA), 0)),
    "unknown vring flags": lambda f: f.conn.send(Request.SET_VRING_ADDR, f.ring_addr(flags=2)),
    "unoffered feature": lambda f: f.conn.send(Request.SET_FEATURES, U64.pack(1 << 63)),
    "unoffered protocol feature": lambda f: f.conn.send(Request.SET_PROTOCOL_FEATURES, U64.pack(1 << 15)),
    "config size mismatch": lambda f: f.conn.send(Request.GET_CONFIG, struct.pack("<III", 0, 60, 0) + bytes(8)),
    "log base overflow": lambda f: f.conn.send(
        Request.SET_LOG_BASE, struct.pack("<QQ", 4096, (1 << 64) - 1024), f.mem.fds[:1]),
    "log base beyond its fd": lambda f: f.conn.send(
        Request.SET_LOG_BASE, struct.pack("<QQ", 2 * MEM_SIZE, 0), f.mem.fds[:1]),
    "inflight 0 queues": lambda f: f.conn.send(Request.GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, 0, 128)),
    "inflight too many queues": lambda f: f.conn.send(Request.GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, QUEUES + 1, 128)),
    "inflight queue size 100": lambda f: f.conn.send(Request.GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, 1, 100)),
    "inflight size mismatch": lambda f: f.conn.send(
        Request.SET_INFLIGHT_FD, INFLIGHT.pack(4096, 0, QUEUES, 128), f.mem.fds[:1]),
    "inflight without fd": lambda f: f.conn.send(Request.SET_INFLIGHT_FD, INFLIGHT.pack(4224, 0, QUEUES, 128)),
}


@pytest.mark.parametrize("case", list(MESSAGE_CASES))
def test_bad_message_breaks_only_this_connection(backend: DaemonUnderTest, case: str) -> None:
    protocol = 1 << P_MQ | 1 << P_REPLY_ACK | 1 << P_CONFIG | 1 << P_LOG_SHMFD | 1 << P_INFLIGHT
    with front_end_to_break(backend, protocol=protocol) as front:
        u64(front.conn.call(Request.GET_FEATURES, reply=True))  # the setup itself was accepted
        MESSAGE_CASES[case](front)


def test_unknown_request_is_refused_not_fatal(backend: DaemonUnderTest) -> None:
    before = len(backend.broken_lines())
    front = RawFrontEnd(backend.socket)
    try:
        assert front.acked(99) != 0
        assert front.acked(Request.SET_SLAVE_REQ_FD, b"", [front.call]) != 0  # not offered
        assert u64(front.conn.call(Request.GET_FEATURES, reply=True)) == front.offered
        assert front.acked(Request.SET_CONFIG, struct.pack("<III", 0, 8, 0) + bytes(8)) != 0  # only wce
    finally:
        front.close()
    assert len(backend.broken_lines()) == before
    survived(backend)


def test_repeated_setup_messages_do_not_leak(backend: DaemonUnderTest) -> None:
    front = RawFrontEnd(backend.socket, protocol=1 << P_MQ | 1 << P_REPLY_ACK | 1 << P_LOG_SHMFD | 1 << P_INFLIGHT)
    try:
        def churn() -> None:
            for _ in range(20):
                front.conn.send(Request.GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, QUEUES, 128))
                data, fds = front.conn.expect_reply(Request.GET_INFLIGHT_FD)
                front.conn.send(Request.SET_INFLIGHT_FD, data, fds)
                os.close(fds[0])
                front.conn.send(Request.SET_VRING_NUM, VRING_STATE.pack(0, front.size))
                front.conn.send(Request.SET_VRING_ADDR, front.ring_addr())
                assert front.acked(Request.SET_MEM_TABLE, front.mem_table(), front.mem.fds) == 0
                front.conn.call(Request.SET_LOG_BASE, struct.pack("<QQ", 4096, 0), front.mem.fds, reply=True)
                front.conn.send(Request.SET_VRING_CALL, U64.pack(0), [front.call])
            u64(front.conn.call(Request.GET_FEATURES, reply=True))  # all of the above processed

        churn()
        settled = backend.fd_count()
        churn()
        assert backend.fd_count() == settled
    finally:
        front.close()
    survived(backend)


# ---- data path -------------------------------------------------------------------------------

DATA = BUF_GPA + 0x1000
STATUS = BUF_GPA + 0x800
IND = BUF_GPA + 0x3000


def _indirect(f: RawFrontEnd, entries: list[tuple[int, int, int, int]], length: int | None = None) -> None:
    for i, entry in enumerate(entries):
        f.desc(i, *entry, table=IND)
    f.desc(0, IND, 16 * len(entries) if length is None else length, INDIRECT)
    f.publish(0)


def _chain(f: RawFrontEnd, descs: list[tuple[int, int, int, int]], head: int = 0) -> None:
    for i, entry in enumerate(descs):
        f.desc(i, *entry)
    f.publish(head)


def _header(f: RawFrontEnd, rtype: int = T_IN) -> None:
    f.mem.write(BUF_GPA, BLK_HEADER.pack(rtype, 0, 0))


def _huge_chain(f: RawFrontEnd) -> None:
    _header(f)
    # 256 readable descriptors of 16 MiB each (all of guest memory): 4 GiB in total
    _chain(f, [(0, MEM_SIZE, NEXT, i + 1) for i in range(255)] + [(0, MEM_SIZE, WRITE, 0)])


DATA_CASES: dict[str, Callable[[RawFrontEnd], None]] = {
    "head >= size": lambda f: f.publish(16),
    "next >= size": lambda f: (_header(f), _chain(f, [(BUF_GPA, 16, NEXT, 16)])),
    "loop": lambda f: (_header(f), _chain(f, [(BUF_GPA, 16, NEXT, 1), (DATA, 512, NEXT, 0)])),
    "zero-length buffer": lambda f: (_header(f), _chain(f, [(BUF_GPA, 16, NEXT, 1), (DATA, 0, WRITE | NEXT, 2),
                                                            (STATUS, 1, WRITE, 0)])),
    "buffer outside memory": lambda f: (_header(f), _chain(f, [(BUF_GPA, 16, NEXT, 1), (MEM_SIZE + 4096, 512, WRITE | NEXT, 2),
                                                               (STATUS, 1, WRITE, 0)])),
    "buffer crossing the end": lambda f: (_header(f), _chain(f, [(BUF_GPA, 16, NEXT, 1), (MEM_SIZE - 512, 1024, WRITE | NEXT, 2),
                                                                 (STATUS, 1, WRITE, 0)])),
    "address wraps": lambda f: (_header(f), _chain(f, [(BUF_GPA, 16, NEXT, 1), ((1 << 64) - 256, 512, WRITE | NEXT, 2),
                                                       (STATUS, 1, WRITE, 0)])),
    "writable before readable": lambda f: (_header(f), _chain(f, [(STATUS, 1, WRITE | NEXT, 1), (BUF_GPA, 16, 0, 0)])),
    "avail idx jump": lambda f: f.publish(0, advance=17),
    "too-short header": lambda f: (_header(f), _chain(f, [(BUF_GPA, 8, NEXT, 1), (STATUS, 1, WRITE, 0)])),
    "no status byte": lambda f: (_header(f), _chain(f, [(BUF_GPA, 16, 0, 0)])),
    "chain of 4 GiB": _huge_chain,
    "indirect len % 16": lambda f: (_header(f), _indirect(f, [(BUF_GPA, 16, NEXT, 1), (STATUS, 1, WRITE, 0)], 24)),
    "indirect too long": lambda f: (_header(f), _indirect(f, [(BUF_GPA, 16, NEXT, 1), (STATUS, 1, WRITE, 0)], 16 * 17)),
    "indirect empty": lambda f: (_header(f), _indirect(f, [], 0)),
    "nested indirect": lambda f: (_header(f), _indirect(f, [(IND, 32, INDIRECT, 0)])),
    "indirect with NEXT": lambda f: (_header(f), f.desc(0, IND, 32, INDIRECT | NEXT, 1), f.publish(0)),
    "indirect loop": lambda f: (_header(f), _indirect(f, [(BUF_GPA, 16, NEXT, 1), (STATUS, 1, WRITE | NEXT, 0)])),
    "indirect next out of table": lambda f: (_header(f), _indirect(f, [(BUF_GPA, 16, NEXT, 2), (STATUS, 1, WRITE, 0)])),
    "indirect table outside memory": lambda f: (f.desc(0, MEM_SIZE - 16, 32, INDIRECT), f.publish(0)),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_ring_breaks_only_this_connection(backend: DaemonUnderTest, case: str) -> None:
    with front_end_to_break(backend, size=256 if case == "chain of 4 GiB" else 16) as front:
        DATA_CASES[case](front)


def test_indirect_table_straddling_regions_is_refused(backend: DaemonUnderTest) -> None:
    with front_end_to_break(backend, regions=2) as front:
        table = MEM_SIZE // 2 - 16  # across the boundary of the two regions
        _header(front)
        front.desc(0, BUF_GPA, 16, NEXT, 1, table=table)
        front.desc(1, STATUS, 1, WRITE, 0, table=table)
        front.desc(0, table, 32, INDIRECT)
        front.publish(0)


def test_unusual_but_valid_chains_work(backend: DaemonUnderTest) -> None:
    """Split headers, data and status sharing a buffer, a buffer across two regions, indirect."""
    before = len(backend.broken_lines())
    front = RawFrontEnd(backend.socket, regions=2)
    boundary = MEM_SIZE // 2
    pattern = os.urandom(1024)
    try:
        # OUT whose header is split 5+7+4 and whose data straddles the region boundary
        front.mem.write(boundary - 512, pattern)
        front.mem.write(BUF_GPA, BLK_HEADER.pack(T_OUT, 0, 24))
        _chain(front, [(BUF_GPA, 5, NEXT, 1), (BUF_GPA + 5, 7, NEXT, 2), (BUF_GPA + 12, 4, NEXT, 3),
                       (boundary - 512, 1024, NEXT, 4), (STATUS, 1, WRITE, 0)])
        front.wait_used(1)
        assert front.mem.read(STATUS, 1) == b"\0"
        # IN into one buffer holding data and status together, through an indirect table
        front.mem.write(BUF_GPA, BLK_HEADER.pack(T_IN, 0, 24))
        front.desc(0, BUF_GPA, 16, NEXT, 1, table=IND)
        front.desc(1, DATA, 1025, WRITE, 0, table=IND)
        front.desc(5, IND, 32, INDIRECT)
        front.publish(5)
        front.wait_used(2)
        assert front.mem.read(DATA, 1025) == pattern + b"\0"
        elem = struct.unpack("<II", front.mem.read(USED_GPA + 4 + 8, 8))
        assert elem == (5, 1025)
    finally:
        front.close()
    assert len(backend.broken_lines()) == before
    with open(backend.image, "rb") as image:
        image.seek(24 * 512)
        assert image.read(1024) == pattern
    survived(backend)


def test_completion_before_call_fd_still_interrupts(backend: DaemonUnderTest) -> None:
    """QEMU 7.2 can enable a ring before its SET_VRING_CALL: the guest must still get its interrupt."""
    front = RawFrontEnd(backend.socket)
    late_call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    front.fds.append(late_call)
    try:
        # NOFD: no call fd for now; acked, so the back end drops the fd before the kick below
        assert front.acked(Request.SET_VRING_CALL, U64.pack(0 | 1 << 8)) == 0
        front.mem.write(BUF_GPA, BLK_HEADER.pack(T_IN, 0, 0))
        _chain(front, [(BUF_GPA, BLK_HEADER.size, NEXT, 1), (DATA, 512, NEXT | WRITE, 2), (STATUS, 1, WRITE, 0)])
        front.wait_used(1)
        front.conn.send(Request.SET_VRING_CALL, U64.pack(0), [late_call])
        wait_for(lambda: _readable(late_call), "the interrupt missed while there was no call fd")
    finally:
        front.close()
    survived(backend)


def _readable(eventfd: int) -> bool:
    try:
        return os.eventfd_read(eventfd) > 0
    except BlockingIOError:
        return False


# ---- dirty log and inflight ------------------------------------------------------------------


def _bit_set(log: bytes, gpa: int) -> bool:
    page = gpa >> 12
    return bool(log[page // 8] >> (page % 8) & 1)


@pytest.mark.parametrize("fault", [None, "no-dirty-log"])
def test_dirty_log_records_device_writes(tmp_path: Path, fault: str | None) -> None:
    with serving(our_blk(tmp_path, *(["--fault", fault] if fault else []))) as backend:
        front = RawFrontEnd(backend.socket, features=1 << F_LOG_ALL,
                            protocol=1 << P_MQ | 1 << P_REPLY_ACK | 1 << P_LOG_SHMFD)
        log_size = MEM_SIZE // 4096 // 8
        log_fd = os.memfd_create("log", os.MFD_CLOEXEC)
        try:
            os.ftruncate(log_fd, log_size)
            assert u64(front.conn.call(Request.SET_LOG_BASE, struct.pack("<QQ", log_size, 0), [log_fd], reply=True)) == 0
            # acked like QEMU does: the ring runs meanwhile and may pick up a request at any time
            assert front.acked(Request.SET_VRING_ADDR, front.ring_addr(flags=1)) == 0
            far = 5 << 20  # a data buffer on a page nothing else touches
            front.request(0, T_IN, 0, [(far, 4096, WRITE), (STATUS, 1, WRITE)])
            front.publish(0)
            front.wait_used(1)
            log = os.pread(log_fd, log_size, 0)
            assert _bit_set(log, USED_GPA)  # used element and used idx
            assert _bit_set(log, STATUS) == (fault is None)
            assert _bit_set(log, far) == (fault is None)
            assert not _bit_set(log, far + 4096)
        finally:
            os.close(log_fd)
            front.close()


@pytest.mark.parametrize("fault", [None, "no-inflight"])
def test_inflight_requests_are_resubmitted_after_reconnect(tmp_path: Path, fault: str | None) -> None:
    """A request popped by a back end that then died is redone by the next one (or lost with the
    fault); the region is taken from GET_INFLIGHT_FD and marked the way the layout says."""
    with serving(our_blk(tmp_path, *(["--fault", fault] if fault else []))) as backend:
        protocol = 1 << P_MQ | 1 << P_REPLY_ACK | 1 << P_INFLIGHT
        front = RawFrontEnd(backend.socket, protocol=protocol, start=False)
        try:
            front.conn.send(Request.GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, 1, 16))
            data, fds = front.conn.expect_reply(Request.GET_INFLIGHT_FD)
            inflight_fd = fds[0]
            front.fds.append(inflight_fd)
            # a dead back end's state: head 3 popped (counter 1), used idx still 0
            os.pwrite(inflight_fd, struct.pack("<B5xHQ", 1, 0, 1), 16 + 16 * 3)
            front.conn.send(Request.SET_INFLIGHT_FD, data, [inflight_fd])
            pattern = os.urandom(512)
            front.mem.write(DATA, pattern)
            front.request(3, T_OUT, 40, [(DATA, 512, 0), (STATUS, 1, WRITE)])
            front.mem.write(AVAIL_GPA + 4, struct.pack("<H", 3))
            front.mem.write(AVAIL_GPA + 2, struct.pack("<H", 1))
            front.avail_idx = 1
            # the restart QEMU does on reconnect: rings from the used index, with the inflight region
            front.conn.send(Request.SET_FEATURES, U64.pack(1 << F_VERSION_1 | 1 << F_PROTOCOL))
            front.acked(Request.SET_MEM_TABLE, front.mem_table(), front.mem.fds)
            front.conn.send(Request.SET_VRING_NUM, VRING_STATE.pack(0, 16))
            front.conn.send(Request.SET_VRING_BASE, VRING_STATE.pack(0, 0))
            front.conn.send(Request.SET_VRING_ADDR, front.ring_addr())
            front.kick, front.call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
            front.fds += [front.kick, front.call]
            front.conn.send(Request.SET_VRING_CALL, U64.pack(0), [front.call])
            front.conn.send(Request.SET_VRING_KICK, U64.pack(0), [front.kick])
            front.conn.send(Request.SET_VRING_ENABLE, VRING_STATE.pack(0, 1))
            if fault:
                time.sleep(0.5)
                assert front.used_idx() == 0  # the request was dropped: the guest would hang
            else:
                front.wait_used(1)
                with open(backend.image, "rb") as image:
                    image.seek(40 * 512)
                    assert image.read(512) == pattern
                inflight = os.pread(inflight_fd, 16, 16 + 16 * 3)
                assert inflight[0] == 0
            base = front.conn.call(Request.GET_VRING_BASE, VRING_STATE.pack(0, 0), reply=True)
            assert VRING_STATE.unpack(base) == (0, 1)
        finally:
            front.close()


# ---- command line ----------------------------------------------------------------------------


def _lab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=30)


def test_cli_errors_are_one_line(tmp_path: Path, backend: DaemonUnderTest) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    sock = str(tmp_path / "s")
    cases = {
        ("--socket", sock, "--image", str(tmp_path / "missing.img")): "cannot open image",
        ("--socket", sock, "--image", str(odd)): "not a non-zero multiple of 512",
        ("--socket", backend.socket, "--image", str(backend.image)): "in use by a live listener",
        ("--socket", sock, "--image", str(backend.image), "--queues", "0"): "queue count 0",
    }
    for args, message in cases.items():
        result = _lab("backend", "blk", *args)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
    backend.check_alive()


def test_stale_socket_is_replaced_and_sigterm_is_clean(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "vu.sock"))
    stale.close()  # the file stays, nobody listens
    with serving(our_blk(tmp_path)) as backend:
        verified_io(backend)
    assert not os.path.exists(backend.socket)
