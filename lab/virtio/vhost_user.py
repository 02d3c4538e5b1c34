"""A vhost-user front end on the host: plays QEMU's role so a back end runs without a guest.

"Guest RAM" is one or more memfds (GuestMemory); the back end maps them from SET_MEM_TABLE.
The message order follows QEMU 7.2's vhost-user-blk (docs/vhost-user.md, "What QEMU 7.2 sends"):
handshake at connect, the device start at DRIVER_OK, SET_VRING_ENABLE(0) + GET_VRING_BASE at stop.
The device status is emulated here: vhost-user has no status for this front end (STATUS is not
negotiated), exactly as QEMU keeps the guest-visible status itself.

VhostUserConnection is the raw wire, also for malformed traffic in back-end robustness tests.
Request numbers and bits are defined here from the spec, independently of lab.vhost_user, so the
two readings of the spec cross-check each other.
"""

from __future__ import annotations

import array
import enum
import logging
import mmap
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import NamedTuple, Sequence

from . import VirtioError
from .mapping import coalesce, mapping_address
from .ring import align_up
from .transport import (
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    F_VERSION_1,
    DmaBuffer,
    Transport,
)

log = logging.getLogger(__name__)


class Request(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_SLAVE_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


# protocol feature bits
PROTOCOL_F_MQ = 0
PROTOCOL_F_LOG_SHMFD = 1
PROTOCOL_F_REPLY_ACK = 3
PROTOCOL_F_SLAVE_REQ = 5
PROTOCOL_F_CONFIG = 9
PROTOCOL_F_INFLIGHT_SHMFD = 12
PROTOCOL_F_RESET_DEVICE = 13
PROTOCOL_F_CONFIGURE_MEM_SLOTS = 15
PROTOCOL_F_STATUS = 16

# virtio feature bits that belong to the vhost-user wire, not to the device
F_LOG_ALL = 26
F_PROTOCOL_FEATURES = 30

FLAG_VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
REPLY_FLAGS = FLAG_VERSION | FLAG_REPLY

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEM_REGION = struct.Struct("<QQQQ")
CONFIG_HEADER = struct.Struct("<III")
INFLIGHT = struct.Struct("<QQHH4x")
MAX_PAYLOAD = 4096  # larger than any reply a front end can legitimately receive
MAX_FDS = 8
MAX_REGIONS = 8
VRING_NOFD = 0x100
BLK_CONFIG_SIZE = 60  # struct virtio_blk_config up to write_zeroes_may_unmap + padding

DEFAULT_PROTOCOL_FEATURES = (
    1 << PROTOCOL_F_MQ | 1 << PROTOCOL_F_REPLY_ACK | 1 << PROTOCOL_F_CONFIG | 1 << PROTOCOL_F_INFLIGHT_SHMFD
)


class BackendClosed(ConnectionError):
    """The back end closed the socket (or died)."""


class BackendTimeout(ConnectionError):
    """The back end did not answer (or accept the connection) in time."""


class ProtocolError(VirtioError):
    """The back end sent something the vhost-user spec does not allow."""


def _bit(n: int) -> int:
    return 1 << n


class VhostUserConnection:
    """One vhost-user socket: framed messages with file descriptors, nothing else."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise BackendTimeout(f"no vhost-user back end listening on {path} after {timeout}s") from exc
                time.sleep(0.02)
            except OSError:
                sock.close()
                raise
        self.sock = sock

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), flags: int = FLAG_VERSION) -> None:
        data = HEADER.pack(request, flags, len(payload)) + bytes(payload)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        log.debug("-> %s flags=%#x size=%d fds=%d", _name(request), flags, len(payload), len(fds))
        self.sock.settimeout(self.timeout)
        try:
            sent = self.sock.sendmsg([data], ancillary)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        except socket.timeout as exc:
            raise BackendTimeout(f"vhost-user back end on {self.path} stopped reading") from exc
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise BackendClosed(f"vhost-user back end on {self.path} closed the connection") from exc

    def recv(self, timeout: float | None = None) -> tuple[int, int, bytes, list[int]]:
        """One message: (request, flags, payload, fds). The caller owns (must close) the fds."""
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        fds: list[int] = []
        try:
            head, ancillary, msg_flags, _ = self.sock.recvmsg(HEADER.size, socket.CMSG_SPACE(MAX_FDS * 4))
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
            if msg_flags & socket.MSG_CTRUNC:
                raise ProtocolError("back end sent more file descriptors than a message may carry")
            if not head:
                raise BackendClosed(f"vhost-user back end on {self.path} closed the connection")
            head += self._recv_exact(HEADER.size - len(head))
            request, flags, size = HEADER.unpack(head)
            if size > MAX_PAYLOAD:
                raise ProtocolError(f"back end announced a {size} B payload for {_name(request)}")
            payload = self._recv_exact(size)
        except socket.timeout as exc:
            _close_all(fds)
            raise BackendTimeout(f"vhost-user back end on {self.path} did not answer in time") from exc
        except ConnectionResetError as exc:
            _close_all(fds)
            raise BackendClosed(f"vhost-user back end on {self.path} reset the connection") from exc
        except BaseException:
            _close_all(fds)
            raise
        log.debug("<- %s flags=%#x size=%d fds=%d", _name(request), flags, size, len(fds))
        return request, flags, payload, fds

    def call(
        self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *, reply: bool, flags: int = FLAG_VERSION
    ) -> bytes:
        """Send; when a reply is expected (always-replied request, or NEED_REPLY) check and return it."""
        self.send(request, payload, fds, flags)
        if not reply and not flags & FLAG_NEED_REPLY:
            return b""
        data, reply_fds = self.expect_reply(request)
        if reply_fds:
            _close_all(reply_fds)
            raise ProtocolError(f"back end attached {len(reply_fds)} fd(s) to its {_name(request)} reply")
        return data

    def expect_reply(self, request: int) -> tuple[bytes, list[int]]:
        """The reply to `request`: same request number, flags exactly VERSION|REPLY (as QEMU demands)."""
        got, flags, data, fds = self.recv()
        if got != request or flags != REPLY_FLAGS:
            _close_all(fds)
            raise ProtocolError(
                f"expected a reply to {_name(request)}, got {_name(got)} with flags {flags:#x} (need {REPLY_FLAGS:#x})"
            )
        return data, fds

    def close(self) -> None:
        self.sock.close()

    def _recv_exact(self, size: int) -> bytes:
        chunks = []
        while size:
            chunk = self.sock.recv(size)
            if not chunk:
                raise BackendClosed(f"vhost-user back end on {self.path} closed the connection mid-message")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)


class MemoryRegion(NamedTuple):
    gpa: int
    size: int
    fd: int
    mmap: mmap.mmap

    @property
    def qva(self) -> int:
        """This process's address of the mapping: what QEMU sends as userspace_addr."""
        return mapping_address(self.mmap)


class GuestMemory:
    """memfd-backed guest RAM shared with the back end; GPAs run contiguously across regions."""

    def __init__(self, size: int, regions: int = 1, gpa_base: int = 0) -> None:
        if not 1 <= regions <= MAX_REGIONS:
            raise VirtioError(f"guest memory needs 1..{MAX_REGIONS} regions, not {regions}")
        if size <= 0 or size % (regions * mmap.PAGESIZE):
            raise VirtioError(f"guest memory size {size} is not a positive multiple of {regions} pages")
        self.size = size
        self.gpa_base = gpa_base
        self.regions: list[MemoryRegion] = []
        per = size // regions
        try:
            for i in range(regions):
                fd = os.memfd_create(f"lab-guest-ram{i}", os.MFD_CLOEXEC)
                try:
                    os.ftruncate(fd, per)
                    mapping = mmap.mmap(fd, per, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                except BaseException:
                    os.close(fd)
                    raise
                self.regions.append(MemoryRegion(gpa_base + i * per, per, fd, mapping))
        except BaseException:
            self.close()
            raise
        self._views = [memoryview(r.mmap) for r in self.regions]
        self._free: list[tuple[int, int]] = [(gpa_base, gpa_base + size)]
        self._allocated: dict[int, int] = {}

    @property
    def fds(self) -> list[int]:
        return [r.fd for r in self.regions]

    def alloc(self, size: int, align: int = 64, *, at: int | None = None, single_region: bool = False) -> int:
        """Reserve `size` bytes (zeroed) and return their GPA; `at` asks for an exact GPA."""
        if size <= 0:
            raise VirtioError(f"cannot allocate {size} bytes of guest memory")
        for index, (start, end) in enumerate(self._free):
            gpa = self._fit(start, end, size, align, at, single_region)
            if gpa is None:
                continue
            pieces = [(s, e) for s, e in ((start, gpa), (gpa + size, end)) if e > s]
            self._free[index : index + 1] = pieces
            self._allocated[gpa] = size
            self.write(gpa, bytes(size))
            return gpa
        where = f"at {at:#x}" if at is not None else f"aligned to {align}"
        raise VirtioError(f"guest memory: no free {size} B range {where}")

    def _fit(self, start: int, end: int, size: int, align: int, at: int | None, single_region: bool) -> int | None:
        if at is not None:
            return at if start <= at and at + size <= end else None
        gpa = align_up(start, align)
        while gpa + size <= end:
            region_end = self._region(gpa).gpa + self._region(gpa).size
            if not single_region or gpa + size <= region_end:
                return gpa
            gpa = align_up(region_end, align)
        return None

    def free(self, gpa: int) -> None:
        size = self._allocated.pop(gpa, None)
        if size is None:
            raise VirtioError(f"guest memory: {gpa:#x} was not allocated")
        self._free = coalesce([*self._free, (gpa, gpa + size)])

    def view(self, gpa: int, size: int) -> memoryview:
        """Writable view of [gpa, gpa+size), which must lie inside one region."""
        region = self._region(gpa)
        offset = gpa - region.gpa
        if size < 0 or offset + size > region.size:
            raise VirtioError(f"guest memory: [{gpa:#x}, +{size:#x}) crosses a region boundary or the end")
        index = (gpa - self.gpa_base) // region.size
        return self._views[index][offset : offset + size]

    def read(self, gpa: int, size: int) -> bytes:
        """Bytes at [gpa, gpa+size), which may span regions."""
        return b"".join(bytes(self.view(g, n)) for g, n in self._pieces(gpa, size))

    def write(self, gpa: int, data: bytes) -> None:
        data = memoryview(data).cast("B")
        done = 0
        for g, n in self._pieces(gpa, len(data)):
            self.view(g, n)[:] = data[done : done + n]
            done += n

    def qva(self, gpa: int) -> int:
        region = self._region(gpa)
        return region.qva + gpa - region.gpa

    def region_of(self, gpa: int, size: int) -> MemoryRegion:
        """The region holding all of [gpa, gpa+size) (rings must not cross regions)."""
        region = self._region(gpa)
        if gpa + size > region.gpa + region.size:
            raise VirtioError(f"[{gpa:#x}, +{size:#x}) crosses a guest memory region boundary")
        return region

    def close(self) -> None:
        for view in getattr(self, "_views", []):
            view.release()
        self._views = []
        for region in self.regions:
            try:
                region.mmap.close()
            except BufferError:  # views handed out are still alive; the mapping goes with them
                pass
            os.close(region.fd)
        self.regions = []

    def _region(self, gpa: int) -> MemoryRegion:
        if self.regions and self.gpa_base <= gpa < self.gpa_base + self.size:
            return self.regions[(gpa - self.gpa_base) // self.regions[0].size]
        raise VirtioError(f"guest memory: GPA {gpa:#x} is outside [{self.gpa_base:#x}, +{self.size:#x})")

    def _pieces(self, gpa: int, size: int) -> list[tuple[int, int]]:
        pieces = []
        while size > 0:
            region = self._region(gpa)
            n = min(size, region.gpa + region.size - gpa)
            pieces.append((gpa, n))
            gpa += n
            size -= n
        return pieces


@dataclass
class _QueueSetup:
    size: int
    desc: int
    avail: int
    used: int
    enabled: bool = False


class VhostUserTransport(Transport):
    """The ops table over a vhost-user socket, with memfd guest memory."""

    def __init__(
        self,
        path: str,
        mem_size: int = 64 << 20,
        timeout: float = 5.0,
        regions: int = 1,
        *,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        config_size: int = BLK_CONFIG_SIZE,
        gpa_base: int = 0,
        max_queue_size: int = 1024,
        config: bytes | None = None,
    ) -> None:
        """`config`: the config space the front end builds itself when the back end does not
        serve GET_CONFIG (QEMU does for vhost-user-scsi)."""
        self.path = path
        self._front_end_config = config
        self.timeout = timeout
        self.wanted_protocol_features = protocol_features
        self.config_size = config_size
        self.max_queue_size = max_queue_size
        self.memory = GuestMemory(mem_size, regions, gpa_base)
        self._status = 0
        self._driver_features = 0
        self._queues: dict[int, _QueueSetup] = {}
        self._kick: dict[int, int] = {}
        self._call: dict[int, int] = {}
        self._call_poll: dict[int, select.poll] = {}
        self._inflight: tuple[bytes, int] | None = None
        self._running = False
        try:
            self.connection = VhostUserConnection(path, timeout)
            self._handshake()
        except BaseException:
            self._release()
            raise

    # ---- handshake and start/stop, in QEMU 7.2's order -------------------------------------

    def _handshake(self) -> None:
        self.backend_features = self._get_u64(Request.GET_FEATURES)
        self.backend_protocol_features = 0
        self.protocol_features = 0
        if self.backend_features & _bit(F_PROTOCOL_FEATURES):
            self.backend_protocol_features = self._get_u64(Request.GET_PROTOCOL_FEATURES)
            self.protocol_features = self.backend_protocol_features & self.wanted_protocol_features
            self.connection.send(Request.SET_PROTOCOL_FEATURES, U64.pack(self.protocol_features))
        self._max_queues = 1
        if self._has_protocol(PROTOCOL_F_MQ):
            self._max_queues = self._get_u64(Request.GET_QUEUE_NUM)
            if not 1 <= self._max_queues <= 0xFF:
                raise ProtocolError(f"back end reports {self._max_queues} queues (GET_QUEUE_NUM)")
        self.connection.send(Request.SET_OWNER)
        if self._get_u64(Request.GET_FEATURES) != self.backend_features:
            raise ProtocolError("back end changed its features between two GET_FEATURES")
        self._config = self._get_config() if self._has_protocol(PROTOCOL_F_CONFIG) else self._front_end_config

    def _start(self, bases: dict[int, int] | None = None) -> None:
        """Everything QEMU sends when the guest sets DRIVER_OK; rings resume at `bases` (default 0)."""
        conn = self.connection
        queues = sorted((i, q) for i, q in self._queues.items() if q.enabled)
        if not queues:
            raise VirtioError("DRIVER_OK without any enabled queue")
        features = self._driver_features
        if self._protocol_wire:
            features |= _bit(F_PROTOCOL_FEATURES)
        conn.send(Request.SET_FEATURES, U64.pack(features))
        if self._has_protocol(PROTOCOL_F_INFLIGHT_SHMFD):
            self._set_inflight(len(self._queues), queues[0][1].size)
        self._set_mem_table()
        for index, q in queues:
            self._start_queue(index, q, (bases or {}).get(index, 0))
        if self._protocol_wire:  # with bit 30 rings start disabled
            for index, _ in queues:
                conn.send(Request.SET_VRING_ENABLE, VRING_STATE.pack(index, 1))
        self._running = True

    def _set_inflight(self, num_queues: int, queue_size: int) -> None:
        if self._inflight is None:
            request = INFLIGHT.pack(0, 0, num_queues, queue_size)
            self.connection.send(Request.GET_INFLIGHT_FD, request)
            data, fds = self.connection.expect_reply(Request.GET_INFLIGHT_FD)
            if len(data) != INFLIGHT.size or len(fds) != 1:
                _close_all(fds)
                raise ProtocolError(f"GET_INFLIGHT_FD reply: {len(data)} B and {len(fds)} fds (need 24 B, 1 fd)")
            mmap_size = INFLIGHT.unpack(data)[0]
            if mmap_size == 0:
                os.close(fds[0])
                raise ProtocolError("GET_INFLIGHT_FD reply has mmap_size 0")
            self._inflight = (data, fds[0])
        data, fd = self._inflight
        self.connection.send(Request.SET_INFLIGHT_FD, data, [fd])

    def _set_mem_table(self) -> None:
        regions = self.memory.regions
        payload = VRING_STATE.pack(len(regions), 0) + b"".join(
            MEM_REGION.pack(r.gpa, r.size, r.qva, 0) for r in regions
        )
        self._send_acked(Request.SET_MEM_TABLE, payload, [r.fd for r in regions])

    def _start_queue(self, index: int, q: _QueueSetup, base: int) -> None:
        conn = self.connection
        mem = self.memory
        mem.region_of(q.desc, 16 * q.size)
        mem.region_of(q.avail, 6 + 2 * q.size)
        mem.region_of(q.used, 6 + 8 * q.size)
        conn.send(Request.SET_VRING_NUM, VRING_STATE.pack(index, q.size))
        conn.send(Request.SET_VRING_BASE, VRING_STATE.pack(index, base))
        conn.send(
            Request.SET_VRING_ADDR,
            VRING_ADDR.pack(index, 0, mem.qva(q.desc), mem.qva(q.used), mem.qva(q.avail), q.used),
        )
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._kick[index] = kick
        self._call[index] = call
        poller = select.poll()
        poller.register(call, select.POLLIN)
        self._call_poll[index] = poller
        conn.send(Request.SET_VRING_KICK, U64.pack(index), [kick])
        conn.send(Request.SET_VRING_CALL, U64.pack(index), [call])

    def _stop(self) -> dict[int, int]:
        """Disable every ring, then collect its base; afterwards the back end leaves memory alone."""
        bases: dict[int, int] = {}
        if self._running:
            self._running = False
            indices = sorted(self._kick)
            if self._protocol_wire:
                for index in indices:
                    self.connection.send(Request.SET_VRING_ENABLE, VRING_STATE.pack(index, 0))
            for index in indices:
                data = self.connection.call(Request.GET_VRING_BASE, VRING_STATE.pack(index, 0), reply=True)
                got_index, bases[index] = self._unpack(VRING_STATE, data, Request.GET_VRING_BASE)
                if got_index != index:
                    raise ProtocolError(f"GET_VRING_BASE for ring {index} answered for ring {got_index}")
        self._close_eventfds()
        return bases

    def reconnect(self, timeout: float | None = None) -> None:
        """Like QEMU with `reconnect=`: new socket, handshake again, restart running rings.

        Rings resume at the used index the old back end published; with INFLIGHT_SHMFD the new
        back end resubmits what was in flight from the inflight region we hand it again.
        """
        running = self._running
        self._running = False
        self._close_eventfds()
        self.connection.close()
        self.connection = VhostUserConnection(self.path, self.timeout if timeout is None else timeout)
        self._handshake()
        if running:
            used = {i: struct.unpack("<H", self.memory.read(q.used + 2, 2))[0] for i, q in self._queues.items()}
            self._start(used)

    # ---- Transport ------------------------------------------------------------------------

    def device_features(self) -> int:
        return self.backend_features & ~(_bit(F_PROTOCOL_FEATURES) | _bit(F_LOG_ALL))

    def set_driver_features(self, features: int) -> None:
        self._driver_features = features

    def get_status(self) -> int:
        return self._status

    def set_status(self, status: int) -> None:
        if status == 0:
            self._stop()
            self._queues.clear()
            self._drop_inflight()
            self._status = 0
            return
        new = status & ~self._status
        if new & STATUS_FEATURES_OK:
            accepted = self._driver_features
            if accepted & ~self.device_features() or not accepted >> F_VERSION_1 & 1:
                status &= ~STATUS_FEATURES_OK  # the device refuses, as a PCI device would
        self._status = status
        if new & STATUS_DRIVER_OK:
            try:
                self._start()
            except VirtioError:
                self._status |= STATUS_NEEDS_RESET
                raise

    def config_generation(self) -> int:
        return 0  # QEMU serves reads from a copy fetched at connect; no generation on this wire

    def read_config(self, offset: int, size: int) -> bytes:
        if self._config is None:
            raise VirtioError("the back end has no config space (PROTOCOL_F_CONFIG not negotiated)")
        if offset < 0 or size < 0 or offset + size > len(self._config):
            raise VirtioError(f"config read [{offset}, +{size}) outside the {len(self._config)} B config space")
        return self._config[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        if not self._has_protocol(PROTOCOL_F_CONFIG):
            raise VirtioError("the back end has no writable config space (PROTOCOL_F_CONFIG not negotiated)")
        if offset < 0 or offset + len(data) > len(self._config):
            raise VirtioError(f"config write [{offset}, +{len(data)}) outside the config space")
        self._send_acked(Request.SET_CONFIG, CONFIG_HEADER.pack(offset, len(data), 0) + bytes(data))
        self._config = self._config[:offset] + bytes(data) + self._config[offset + len(data) :]

    def num_queues(self) -> int:
        return self._max_queues

    def queue_max_size(self, index: int) -> int:
        return self.max_queue_size if 0 <= index < self._max_queues else 0

    def setup_queue(self, index: int, size: int, desc: int, avail: int, used: int) -> None:
        if not 0 <= index < self._max_queues:
            raise VirtioError(f"queue {index} does not exist (the back end has {self._max_queues})")
        self._queues[index] = _QueueSetup(size, desc, avail, used)

    def enable_queue(self, index: int) -> None:
        self._queues[index].enabled = True

    def notify(self, index: int) -> None:
        os.eventfd_write(self._kick[index], 1)

    def alloc_dma(self, size: int, align: int = 4096) -> DmaBuffer:
        gpa = self.memory.alloc(size, align, single_region=True)
        return DmaBuffer(gpa, self.memory.view(gpa, size))

    def free_dma(self, buffer: DmaBuffer) -> None:
        self.memory.free(buffer.addr)

    def wait(self, index: int, timeout: float) -> bool:
        if not self._call_poll[index].poll(max(int(timeout * 1000), 1)):
            return False
        try:
            os.eventfd_read(self._call[index])
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        try:
            if self._running:
                self._stop()
        except (ConnectionError, VirtioError) as exc:
            log.debug("stopping the rings at close failed: %s", exc)
        finally:
            self._release()

    # ---- helpers --------------------------------------------------------------------------

    def _release(self) -> None:
        self._running = False
        self._close_eventfds()
        self._drop_inflight()
        connection = getattr(self, "connection", None)
        if connection is not None:
            connection.close()
        self.memory.close()

    def _close_eventfds(self) -> None:
        _close_all(list(self._kick.values()) + list(self._call.values()))
        self._kick.clear()
        self._call.clear()
        self._call_poll.clear()

    def _drop_inflight(self) -> None:
        if self._inflight is not None:
            os.close(self._inflight[1])
            self._inflight = None

    @property
    def _protocol_wire(self) -> bool:
        """VHOST_USER_F_PROTOCOL_FEATURES is offered (and then always taken, as QEMU does)."""
        return bool(self.backend_features >> F_PROTOCOL_FEATURES & 1)

    def _has_protocol(self, feature_bit: int) -> bool:
        return bool(self.protocol_features >> feature_bit & 1)

    def _get_u64(self, request: Request) -> int:
        return self._unpack(U64, self.connection.call(request, reply=True), request)[0]

    def _get_config(self) -> bytes:
        request = CONFIG_HEADER.pack(0, self.config_size, 0) + bytes(self.config_size)
        data = self.connection.call(Request.GET_CONFIG, request, reply=True)
        if len(data) != CONFIG_HEADER.size + self.config_size:
            raise ProtocolError(f"GET_CONFIG reply is {len(data)} B, expected {CONFIG_HEADER.size + self.config_size}")
        offset, size, _ = CONFIG_HEADER.unpack_from(data)
        if offset != 0 or size != self.config_size:
            raise ProtocolError(f"GET_CONFIG reply describes [{offset}, +{size}), asked [0, +{self.config_size})")
        return data[CONFIG_HEADER.size :]

    def _send_acked(self, request: Request, payload: bytes, fds: Sequence[int] = ()) -> None:
        """Send; with REPLY_ACK negotiated, ask for and check the u64 status like QEMU does."""
        if not self._has_protocol(PROTOCOL_F_REPLY_ACK):
            self.connection.send(request, payload, fds)
            return
        data = self.connection.call(request, payload, fds, reply=True, flags=FLAG_VERSION | FLAG_NEED_REPLY)
        status = self._unpack(U64, data, request)[0]
        if status != 0:
            raise VirtioError(f"back end rejected {request.name} (status {status})")

    @staticmethod
    def _unpack(layout: struct.Struct, data: bytes, request: Request) -> tuple:
        if len(data) != layout.size:
            raise ProtocolError(f"{request.name} reply is {len(data)} B, expected {layout.size}")
        return layout.unpack(data)


def _name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
