"""vhost-user wire format: request numbers, feature bits, payload structs, strict decode.

Every front-end message is decoded against a table of exact payload sizes and fd counts before a
handler sees it; a violation raises DeviceBroken (the connection is closed by the server).

Policy for requests we do not implement (or whose protocol feature was not negotiated): they are
not a violation - log a warning, answer u64 1 (failure) if NEED_REPLY was set, and continue. A
well-formed but unsupported request must not cost a guest its disk.
"""

from __future__ import annotations

import enum
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

from lab.vhost_user import DeviceBroken

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEMORY_HEADER = struct.Struct("<II")
MEMORY_REGION = struct.Struct("<QQQQ")
LOG_BASE = struct.Struct("<QQ")
CONFIG_HEADER = struct.Struct("<III")
INFLIGHT = struct.Struct("<QQHH4x")

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

MAX_FDS = 8
MAX_REGIONS = 8
MAX_CONFIG_SIZE = 256
MAX_PAYLOAD = CONFIG_HEADER.size + MAX_CONFIG_SIZE  # the largest payload in the union
MAX_QUEUE_SIZE = 32768
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 0x100
VRING_F_LOG = 0x1


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


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of the vhost-user protocol features."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    SLAVE_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    SLAVE_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


# Virtio feature bits the vhost-user transport itself deals with.
F_LOG_ALL = 26
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_PROTOCOL_FEATURES = 30
F_VERSION_1 = 32


def bit(n: int) -> int:
    return 1 << n


@dataclass(frozen=True)
class VringState:
    index: int
    num: int


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True)
class VringFile:
    index: int
    nofd: bool


@dataclass(frozen=True)
class MemoryRegion:
    gpa: int
    size: int
    uaddr: int
    offset: int


@dataclass(frozen=True)
class MemoryTable:
    regions: tuple[MemoryRegion, ...]


@dataclass(frozen=True)
class LogBase:
    size: int
    offset: int


@dataclass(frozen=True)
class ConfigAccess:
    offset: int
    size: int
    flags: int
    data: bytes


@dataclass(frozen=True)
class Inflight:
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@dataclass
class Message:
    """One received message; handlers take the fds they keep, the server closes the rest."""

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"UNKNOWN_{self.request}"

    def take_fd(self, i: int = 0) -> int:
        fd = self.fds[i]
        self.fds[i] = -1
        return fd

    def close_fds(self) -> None:
        for i, fd in enumerate(self.fds):
            if fd >= 0:
                os.close(fd)
                self.fds[i] = -1


def check_header(request: int, flags: int, size: int) -> None:
    """Validate a header before its payload is read."""
    if flags & VERSION_MASK != VERSION:
        raise DeviceBroken(f"request {request}: protocol version {flags & VERSION_MASK}, expected 1")
    if flags & ~(VERSION_MASK | FLAG_NEED_REPLY):
        raise DeviceBroken(f"request {request}: unexpected header flags {flags:#x}")
    if size > MAX_PAYLOAD:
        raise DeviceBroken(f"request {request}: payload of {size} bytes exceeds the maximum {MAX_PAYLOAD}")


def _exact(msg: Message, size: int, fds: int = 0) -> None:
    if len(msg.payload) != size:
        raise DeviceBroken(f"{msg.name}: payload is {len(msg.payload)} bytes, expected {size}")
    if len(msg.fds) != fds:
        raise DeviceBroken(f"{msg.name}: {len(msg.fds)} fds attached, expected {fds}")


def _ring_index(msg: Message, index: int, num_queues: int) -> int:
    if index >= num_queues:
        raise DeviceBroken(f"{msg.name}: vring index {index} out of range (device has {num_queues})")
    return index


def _no_payload(msg: Message, num_queues: int) -> None:
    _exact(msg, 0)


def _u64(msg: Message, num_queues: int) -> int:
    _exact(msg, U64.size)
    return U64.unpack(msg.payload)[0]


def _vring_state(msg: Message, num_queues: int) -> VringState:
    _exact(msg, VRING_STATE.size)
    index, num = VRING_STATE.unpack(msg.payload)
    return VringState(_ring_index(msg, index, num_queues), num)


def _vring_num(msg: Message, num_queues: int) -> VringState:
    state = _vring_state(msg, num_queues)
    n = state.num
    if n == 0 or n > MAX_QUEUE_SIZE or n & (n - 1):
        raise DeviceBroken(f"{msg.name}: queue size {n} is not a power of two in 1..{MAX_QUEUE_SIZE}")
    return state


def _vring_base(msg: Message, num_queues: int) -> VringState:
    state = _vring_state(msg, num_queues)
    if state.num > 0xFFFF:
        raise DeviceBroken(f"{msg.name}: split-ring base {state.num} does not fit 16 bits")
    return state


def _vring_enable(msg: Message, num_queues: int) -> VringState:
    state = _vring_state(msg, num_queues)
    if state.num not in (0, 1):
        raise DeviceBroken(f"{msg.name}: enable value {state.num} is neither 0 nor 1")
    return state


def _vring_addr(msg: Message, num_queues: int) -> VringAddr:
    _exact(msg, VRING_ADDR.size)
    addr = VringAddr(*VRING_ADDR.unpack(msg.payload))
    _ring_index(msg, addr.index, num_queues)
    if addr.flags & ~VRING_F_LOG:
        raise DeviceBroken(f"{msg.name}: unknown vring address flags {addr.flags:#x}")
    return addr


def _vring_file(msg: Message, num_queues: int) -> VringFile:
    if len(msg.payload) != U64.size:
        raise DeviceBroken(f"{msg.name}: payload is {len(msg.payload)} bytes, expected 8")
    value = U64.unpack(msg.payload)[0]
    if value & ~(VRING_INDEX_MASK | VRING_NOFD):
        raise DeviceBroken(f"{msg.name}: unknown bits in {value:#x}")
    nofd = bool(value & VRING_NOFD)
    _exact(msg, U64.size, 0 if nofd else 1)
    return VringFile(_ring_index(msg, value & VRING_INDEX_MASK, num_queues), nofd)


def _checked_range(msg: Message, what: str, start: int, size: int) -> None:
    if start + size > 1 << 64:
        raise DeviceBroken(f"{msg.name}: {what} {start:#x}+{size:#x} overflows 64 bits")


def _memory_table(msg: Message, num_queues: int) -> MemoryTable:
    if len(msg.payload) < MEMORY_HEADER.size:
        raise DeviceBroken(f"{msg.name}: payload of {len(msg.payload)} bytes has no region count")
    nregions, _pad = MEMORY_HEADER.unpack_from(msg.payload)
    if not 1 <= nregions <= MAX_REGIONS:
        raise DeviceBroken(f"{msg.name}: {nregions} regions, expected 1..{MAX_REGIONS}")
    _exact(msg, MEMORY_HEADER.size + nregions * MEMORY_REGION.size, nregions)
    regions = []
    for i in range(nregions):
        region = MemoryRegion(*MEMORY_REGION.unpack_from(msg.payload, MEMORY_HEADER.size + i * MEMORY_REGION.size))
        if region.size == 0:
            raise DeviceBroken(f"{msg.name}: region {i} has size 0")
        _checked_range(msg, f"region {i} guest address", region.gpa, region.size)
        _checked_range(msg, f"region {i} user address", region.uaddr, region.size)
        _checked_range(msg, f"region {i} mmap offset", region.offset, region.size)
        regions.append(region)
    ordered = sorted(regions, key=lambda r: r.gpa)
    for a, b in zip(ordered, ordered[1:]):
        if a.gpa + a.size > b.gpa:
            raise DeviceBroken(f"{msg.name}: regions at {a.gpa:#x} and {b.gpa:#x} overlap")
    return MemoryTable(tuple(regions))


def _log_base(msg: Message, num_queues: int) -> LogBase:
    _exact(msg, LOG_BASE.size, 1)
    log = LogBase(*LOG_BASE.unpack(msg.payload))
    if log.size == 0:
        raise DeviceBroken(f"{msg.name}: log size 0")
    _checked_range(msg, "log offset", log.offset, log.size)
    return log


def _config(msg: Message, num_queues: int) -> ConfigAccess:
    if len(msg.payload) < CONFIG_HEADER.size:
        raise DeviceBroken(f"{msg.name}: payload of {len(msg.payload)} bytes has no config header")
    offset, size, flags = CONFIG_HEADER.unpack_from(msg.payload)
    if size > MAX_CONFIG_SIZE:
        raise DeviceBroken(f"{msg.name}: config size {size} exceeds {MAX_CONFIG_SIZE}")
    _exact(msg, CONFIG_HEADER.size + size)
    return ConfigAccess(offset, size, flags, msg.payload[CONFIG_HEADER.size :])


def _inflight(fds: int) -> Callable[[Message, int], Inflight]:
    def decode(msg: Message, num_queues: int) -> Inflight:
        _exact(msg, INFLIGHT.size, fds)
        inflight = Inflight(*INFLIGHT.unpack(msg.payload))
        if not 1 <= inflight.num_queues <= num_queues:
            raise DeviceBroken(f"{msg.name}: {inflight.num_queues} queues, device has 1..{num_queues}")
        q = inflight.queue_size
        if q == 0 or q > MAX_QUEUE_SIZE or q & (q - 1):
            raise DeviceBroken(f"{msg.name}: queue size {q} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        _checked_range(msg, "inflight offset", inflight.mmap_offset, inflight.mmap_size)
        return inflight

    return decode


DECODERS: dict[Request, Callable[[Message, int], Any]] = {
    Request.GET_FEATURES: _no_payload,
    Request.SET_FEATURES: _u64,
    Request.SET_OWNER: _no_payload,
    Request.RESET_OWNER: _no_payload,
    Request.SET_MEM_TABLE: _memory_table,
    Request.SET_LOG_BASE: _log_base,
    Request.SET_VRING_NUM: _vring_num,
    Request.SET_VRING_ADDR: _vring_addr,
    Request.SET_VRING_BASE: _vring_base,
    Request.GET_VRING_BASE: _vring_state,
    Request.SET_VRING_KICK: _vring_file,
    Request.SET_VRING_CALL: _vring_file,
    Request.SET_VRING_ERR: _vring_file,
    Request.GET_PROTOCOL_FEATURES: _no_payload,
    Request.SET_PROTOCOL_FEATURES: _u64,
    Request.GET_QUEUE_NUM: _no_payload,
    Request.SET_VRING_ENABLE: _vring_enable,
    Request.GET_CONFIG: _config,
    Request.SET_CONFIG: _config,
    Request.GET_INFLIGHT_FD: _inflight(0),
    Request.SET_INFLIGHT_FD: _inflight(1),
    Request.RESET_DEVICE: _no_payload,
    Request.POSTCOPY_ADVISE: _no_payload,
    Request.POSTCOPY_LISTEN: _no_payload,
    Request.POSTCOPY_END: _no_payload,
}

# Requests only valid once their protocol feature is negotiated; otherwise they count as unknown.
GATED: dict[Request, ProtocolFeature] = {
    Request.SET_LOG_BASE: ProtocolFeature.LOG_SHMFD,
    Request.GET_CONFIG: ProtocolFeature.CONFIG,
    Request.SET_CONFIG: ProtocolFeature.CONFIG,
    Request.GET_INFLIGHT_FD: ProtocolFeature.INFLIGHT_SHMFD,
    Request.SET_INFLIGHT_FD: ProtocolFeature.INFLIGHT_SHMFD,
    Request.RESET_DEVICE: ProtocolFeature.RESET_DEVICE,
    Request.POSTCOPY_ADVISE: ProtocolFeature.PAGEFAULT,
    Request.POSTCOPY_LISTEN: ProtocolFeature.PAGEFAULT,
    Request.POSTCOPY_END: ProtocolFeature.PAGEFAULT,
}


def supported(request: int, protocol_features: int) -> bool:
    if request not in DECODERS:
        return False
    gate = GATED.get(Request(request))
    return gate is None or bool(protocol_features & bit(gate))


def decode(msg: Message, num_queues: int) -> Any:
    """The typed payload of a supported request; DeviceBroken on any malformed detail."""
    return DECODERS[Request(msg.request)](msg, num_queues)


def encode_memory_table(regions: tuple[MemoryRegion, ...]) -> bytes:
    """A SET_MEM_TABLE payload (the postcopy reply carries the back end's addresses in it)."""
    return MEMORY_HEADER.pack(len(regions), 0) + b"".join(
        MEMORY_REGION.pack(r.gpa, r.size, r.uaddr, r.offset) for r in regions
    )


def encode_reply(request: int, payload: bytes) -> bytes:
    return HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload


def require_regular_file(fd: int, what: str, needed: int) -> None:
    """Shared-memory fds must be regular files (memfd, hugetlbfs, tmpfs) at least `needed` long;
    mapping past the end of a file turns the first access into SIGBUS."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise DeviceBroken(f"{what}: fd is not a regular file (memfd)")
    if st.st_size < needed:
        raise DeviceBroken(f"{what}: fd holds {st.st_size} bytes, {needed} needed")


def decode_reply(request: int, payload: bytes) -> Any:
    """A reply's payload in typed form, for the trace."""
    if request == Request.GET_VRING_BASE and len(payload) == VRING_STATE.size:
        return VringState(*VRING_STATE.unpack(payload))
    if request == Request.GET_INFLIGHT_FD and len(payload) == INFLIGHT.size:
        return Inflight(*INFLIGHT.unpack(payload))
    if request == Request.GET_CONFIG and len(payload) >= CONFIG_HEADER.size:
        offset, size, flags = CONFIG_HEADER.unpack_from(payload)
        return ConfigAccess(offset, size, flags, payload[CONFIG_HEADER.size :])
    if request == Request.SET_MEM_TABLE and len(payload) > U64.size:
        n = MEMORY_HEADER.unpack_from(payload)[0]
        return MemoryTable(tuple(
            MemoryRegion(*MEMORY_REGION.unpack_from(payload, MEMORY_HEADER.size + i * MEMORY_REGION.size))
            for i in range(n)
        ))
    if len(payload) == U64.size:
        return U64.unpack(payload)[0]
    return payload


def describe_fd(fd: int) -> dict[str, Any]:
    """A trace-friendly description of a received fd, e.g. {"fd": "memfd", "size": N}."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return {"fd": "closed"}
    if target.startswith("/memfd:"):
        return {"fd": "memfd", "size": os.fstat(fd).st_size}
    if target.startswith("anon_inode:"):
        return {"fd": target[len("anon_inode:") :].strip("[]")}
    if target.startswith(("socket:", "pipe:")):
        return {"fd": target.split(":")[0]}
    return {"fd": "file", "path": target, "size": os.fstat(fd).st_size}


def describe(value: Any) -> Any:
    """A JSON-friendly form of a decoded payload."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, (MemoryTable,)):
        return {"regions": [describe(r) for r in value.regions]}
    if hasattr(value, "__dataclass_fields__"):
        return {k: describe(getattr(value, k)) for k in value.__dataclass_fields__}
    return value
