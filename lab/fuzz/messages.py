"""The hostile front end: message sequences, random and mutated from QEMU 7.2's own session.

A case is a tuple of Msg. The daemon must answer (or hang up) after every message, and once we
hang up it must be back to idle (target.Daemon.settle). Sequences come three ways: a valid
prefix of the session below followed by random messages, the session with a few mutations
(a field set to an edge value, a message dropped, duplicated, swapped, cut short, given other
fds), and the explicit seeds (SEEDS: the bad-input list of docs/vhost-user.md and the shapes of
historic CVEs in other back ends).
"""

from __future__ import annotations

from hypothesis import strategies as st

from lab.fuzz.memory import GUARD, REGION_SIZE, SIZE
from lab.fuzz.target import QUEUES, Daemon
from lab.fuzz.wire import FD_KINDS, Field, Msg, Value, case_session
from lab.vhost_user.inflight import region_size
from lab.virtio.vhost_user import Request as R

NEED_REPLY = 0x9
PROTOCOL = 1 << 0 | 1 << 1 | 1 << 3 | 1 << 9 | 1 << 12 | 1 << 13  # MQ LOG_SHMFD REPLY_ACK CONFIG INFLIGHT RESET
FEATURES = 1 << 32 | 1 << 30 | 1 << 28 | 1 << 29  # VERSION_1 PROTOCOL_FEATURES INDIRECT EVENT_IDX
RING_SIZE = 16
INFLIGHT_SIZE = region_size(QUEUES, RING_SIZE)


def ring_gpa(queue: int, part: int) -> int:
    """desc (0), avail (1), used (2) of `queue` in region 0."""
    return 0x1000 + 0x4000 * queue + 0x1000 * part


def _u64(request: int, value: int, flags: int = 1, fds: tuple[str, ...] = ()) -> Msg:
    return Msg(request, flags, (("Q", value),), fds)


def _state(request: int, index: int, num: int) -> Msg:
    return Msg(request, 1, (("I", index), ("I", num)))


def _addr(queue: int, flags: int = 0) -> Msg:
    q = lambda part: f"qva:{ring_gpa(queue, part):#x}"
    return Msg(R.SET_VRING_ADDR, 1, (("I", queue), ("I", flags), ("Q", q(0)), ("Q", q(2)), ("Q", q(1)),
                                       ("Q", ring_gpa(queue, 2))))


def mem_table(regions: list[tuple[Value, ...]] | None = None, fds: tuple[str, ...] | None = None) -> Msg:
    regions = regions if regions is not None else [
        (i * REGION_SIZE, REGION_SIZE, f"qva:{i * REGION_SIZE:#x}", GUARD) for i in range(2)]
    fields: list[Field] = [("I", len(regions)), ("I", 0)]
    for region in regions:
        fields += [("Q", v) for v in region]
    return Msg(R.SET_MEM_TABLE, NEED_REPLY, tuple(fields),
               fds if fds is not None else tuple(f"region{i}" for i in range(len(regions))))


def inflight(request: int, size: int = 0, num_queues: int = QUEUES, queue_size: int = RING_SIZE,
             fds: tuple[str, ...] = ()) -> Msg:
    return Msg(request, 1, (("Q", size), ("Q", 0), ("H", num_queues), ("H", queue_size), ("I", 0)), fds)


def log_base(size: int = 4096, offset: int = 0, fds: tuple[str, ...] = ("memfd",)) -> Msg:
    return Msg(R.SET_LOG_BASE, 1, (("Q", size), ("Q", offset)), fds)


def config(request: int, offset: int = 0, size: int = 60) -> Msg:
    return Msg(request, 1, (("I", offset), ("I", size), ("I", 0)), (), bytes(size))


def _start(queue: int) -> list[Msg]:
    return [
        _state(R.SET_VRING_NUM, queue, RING_SIZE),
        _state(R.SET_VRING_BASE, queue, 0),
        _addr(queue),
        _u64(R.SET_VRING_KICK, queue, fds=("eventfd",)),
        _u64(R.SET_VRING_CALL, queue, fds=("eventfd",)),
        _state(R.SET_VRING_ENABLE, queue, 1),
    ]


# What QEMU 7.2 sends to a vhost-user-blk back end over a device's life (docs/vhost-user.md).
SESSION: tuple[Msg, ...] = (
    Msg(R.GET_FEATURES),
    Msg(R.GET_PROTOCOL_FEATURES),
    _u64(R.SET_PROTOCOL_FEATURES, PROTOCOL),
    Msg(R.GET_QUEUE_NUM),
    Msg(R.SET_OWNER),
    Msg(R.GET_FEATURES),
    *[_u64(R.SET_VRING_CALL, q, fds=("eventfd",)) for q in range(QUEUES)],
    config(R.GET_CONFIG),
    _u64(R.SET_FEATURES, FEATURES),
    inflight(R.GET_INFLIGHT_FD),
    inflight(R.SET_INFLIGHT_FD, INFLIGHT_SIZE, fds=("inflight",)),
    mem_table(),
    *[m for q in range(QUEUES) for m in _start(q)],
    log_base(),
    _u64(R.SET_FEATURES, FEATURES | 1 << 26),
    Msg(R.SET_VRING_ADDR, NEED_REPLY, _addr(0, 1).fields),
    config(R.SET_CONFIG, 32, 1),
    *[_state(R.SET_VRING_ENABLE, q, 0) for q in range(QUEUES)],
    *[_state(R.GET_VRING_BASE, q, 0) for q in range(QUEUES)],
    Msg(R.RESET_DEVICE),
)


# ---- edge values -------------------------------------------------------------------------------

_EDGES = {
    "B": [0, 1, 0x7F, 0x80, 0xFF],
    "H": [0, 1, 2, 15, 16, 17, 127, 128, 256, 0x7FFF, 0x8000, 0xFFFF],
    "I": [0, 1, 2, 3, 7, 8, 9, 16, 32, 60, 255, 256, 257, 0x100, 0x1FF, 4095, 4096, 32768, 32769, 65535, 65536,
          0x7FFFFFFF, 0x80000000, 0xFFFFFFFF],
    "Q": [0, 1, 8, 0x100, 0x101, 0x1FF, 4095, 4096, REGION_SIZE - 4096, REGION_SIZE, SIZE, GUARD, 1 << 32,
          (1 << 63), (1 << 64) - 4096, (1 << 64) - 1, INFLIGHT_SIZE],
}


def edge(fmt: str) -> st.SearchStrategy[Value]:
    width = {"B": 8, "H": 16, "I": 32, "Q": 64}[fmt]
    values: st.SearchStrategy[Value] = st.sampled_from(_EDGES[fmt]) | st.integers(0, (1 << width) - 1)
    if fmt == "Q":
        values = values | st.builds(lambda gpa: f"qva:{gpa:#x}", st.sampled_from(
            [0, ring_gpa(0, 0), ring_gpa(0, 2), REGION_SIZE - 8, REGION_SIZE, SIZE - 16, SIZE]))
    return values


requests = st.sampled_from([int(r) for r in R] + [0, 26, 27, 33, 41, 99, 0xFFFFFFFF])
flags = st.sampled_from([1, 1, 1, NEED_REPLY, NEED_REPLY, 0, 2, 3, 5, 0xD, 0x11, 0x101, 0xFFFFFFFF])
fd_lists = st.lists(st.sampled_from(FD_KINDS), max_size=10).map(tuple)


@st.composite
def fuzzed(draw: st.DrawFn, base: Msg) -> Msg:
    """`base` with some of its fields (or fds) set to edge values."""
    fields = tuple((fmt, draw(st.just(value) | edge(fmt))) for fmt, value in base.fields)
    fds = draw(st.just(base.fds) | fd_lists)
    return Msg(base.request, base.flags, fields, fds, base.extra)


@st.composite
def random_message(draw: st.DrawFn) -> Msg:
    """A session message with fuzzed fields, or any request with any small payload."""
    if draw(st.booleans()):
        return draw(fuzzed(draw(st.sampled_from(SESSION))))
    fields = draw(st.lists(st.sampled_from("BHIQ").flatmap(lambda f: st.tuples(st.just(f), edge(f))), max_size=8))
    return Msg(draw(requests), draw(flags), tuple(fields), draw(fd_lists))


@st.composite
def mutated_session(draw: st.DrawFn) -> tuple[Msg, ...]:
    msgs = list(SESSION[: draw(st.integers(1, len(SESSION)))])
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(msgs) - 1))
        op = draw(st.sampled_from(["fuzz", "fuzz", "drop", "dup", "swap", "request", "flags", "cut", "extra",
                                   "fds", "lie", "insert"]))
        m = msgs[i]
        if op == "fuzz":
            msgs[i] = draw(fuzzed(m))
        elif op == "drop" and len(msgs) > 1:
            del msgs[i]
        elif op == "dup":
            msgs[i:i] = [m] * draw(st.integers(1, 20))
        elif op == "swap" and i + 1 < len(msgs):
            msgs[i], msgs[i + 1] = msgs[i + 1], m
        elif op == "request":
            msgs[i] = Msg(draw(requests), m.flags, m.fields, m.fds, m.extra)
        elif op == "flags":
            msgs[i] = Msg(m.request, draw(flags), m.fields, m.fds, m.extra)
        elif op == "cut":
            msgs[i] = Msg(m.request, m.flags, m.fields, m.fds, m.extra, cut=draw(st.integers(1, 64)))
        elif op == "extra":
            msgs[i] = Msg(m.request, m.flags, m.fields, m.fds, m.extra + draw(st.binary(min_size=1, max_size=300)))
        elif op == "fds":
            msgs[i] = Msg(m.request, m.flags, m.fields, draw(fd_lists), m.extra)
        elif op == "lie":  # a header size beyond the maximum, or short of the payload: no stall
            size = draw(st.sampled_from([269, 4096, 0xFFFFFFFF]) | st.integers(0, 8))
            msgs[i] = Msg(m.request, m.flags, m.fields, m.fds, m.extra, declared=size)
        elif op == "insert":
            msgs.insert(i, draw(random_message()))
    return tuple(msgs)


@st.composite
def prefixed_random(draw: st.DrawFn) -> tuple[Msg, ...]:
    prefix = SESSION[: draw(st.sampled_from([0, 3, 5, 12, 13, len(SESSION) - 10]))]
    return prefix + tuple(draw(st.lists(random_message(), min_size=1, max_size=12)))


sequences = mutated_session() | prefixed_random()


def run(daemon: Daemon, msgs: tuple[Msg, ...]) -> str:
    """One case; raises Finding. Returns "broken" or "kept" (who ended the connection)."""
    with case_session(daemon) as (wire, _memory):
        for i, msg in enumerate(msgs):
            wire.send(msg)
            wire.probe(f"message {i} (request {msg.request})", after=msg)
            if wire.closed:
                break
    return "broken" if wire.closed else "kept"


# ---- seeds: the doc's bad inputs and the historic CVE shapes ------------------------------------

_HANDSHAKE = SESSION[:12]  # through SET_INFLIGHT_FD
_STARTED = SESSION[: 13 + 6 * QUEUES]  # rings configured and enabled


def _set(m: Msg, index: int, value: Value) -> Msg:
    fields = list(m.fields)
    fields[index] = (fields[index][0], value)
    return Msg(m.request, m.flags, tuple(fields), m.fds, m.extra, m.cut, m.declared)


def _with(m: Msg, **changes) -> Msg:
    values = {k: getattr(m, k) for k in Msg.__dataclass_fields__}
    return Msg(**{**values, **changes})


SEEDS: dict[str, tuple[Msg, ...]] = {
    "unknown request": (Msg(99, NEED_REPLY), Msg(0xFFFFFFFF)),
    "version 0": (Msg(R.GET_FEATURES, 0),),
    "version 2": (Msg(R.GET_FEATURES, 2),),
    "reply flag": (Msg(R.GET_FEATURES, 5),),
    "payload short": (Msg(R.SET_FEATURES, 1, (("I", 0),)),),
    "payload long": (_with(_state(R.SET_VRING_NUM, 0, 16), extra=bytes(4)),),
    "size above maximum": (Msg(R.SET_MEM_TABLE, 1, (), (), bytes(64), declared=0xFFFFFFF0),),
    "header stalls mid-payload": (Msg(R.SET_FEATURES, 1, (("I", 0),), declared=8),),
    "unexpected fds": (Msg(R.SET_OWNER, 1, (), ("eventfd", "memfd", "pipe")),),
    "nine fds": (_u64(R.SET_VRING_CALL, 0, fds=("eventfd",) * 9),),
    "missing kick fd": (*_HANDSHAKE, _u64(R.SET_VRING_KICK, 0)),
    "kick is a memfd": (*_HANDSHAKE, _u64(R.SET_VRING_KICK, 0, fds=("memfd",))),
    "nregions 0": (*_HANDSHAKE, mem_table([], ())),
    "nregions 9": (*_HANDSHAKE, mem_table([(i << 24, 4096, 0, 0) for i in range(9)], ("region0",) * 9)),
    "region size 0": (*_HANDSHAKE, mem_table([(0, 0, "qva:0", GUARD)], ("region0",))),
    "gpa overflow": (*_HANDSHAKE, mem_table([((1 << 64) - 4096, 8192, "qva:0", GUARD)], ("region0",))),
    "uaddr overflow": (*_HANDSHAKE, mem_table([(0, 8192, (1 << 64) - 4096, GUARD)], ("region0",))),
    "offset overflow": (*_HANDSHAKE, mem_table([(0, 8192, "qva:0", (1 << 64) - 4096)], ("region0",))),
    "region larger than its fd": (*_HANDSHAKE, mem_table([(0, 1 << 40, "qva:0", GUARD)], ("region0",))),
    "region fd is a pipe": (*_HANDSHAKE, mem_table([(0, 4096, "qva:0", 0)], ("pipe",))),
    **{f"vring index on {name}": (*_STARTED, msg) for name, msg in {
        "NUM": _state(R.SET_VRING_NUM, QUEUES, 16), "BASE": _state(R.SET_VRING_BASE, 200, 0),
        "ADDR": _set(_addr(0), 0, QUEUES), "GET_BASE": _state(R.GET_VRING_BASE, 0xFFFFFFFF, 0),
        "KICK": _u64(R.SET_VRING_KICK, QUEUES | 0x100), "CALL": _u64(R.SET_VRING_CALL, 0xFF, fds=("eventfd",)),
        "ERR": _u64(R.SET_VRING_ERR, QUEUES, fds=("eventfd",)), "ENABLE": _state(R.SET_VRING_ENABLE, QUEUES, 1),
    }.items()},  # CVE-2020-10723
    **{f"queue size {n}": (*_HANDSHAKE, _state(R.SET_VRING_NUM, 0, n)) for n in (0, 3, 32769, 65536)},
    "ring outside memory": (*_HANDSHAKE, mem_table(), _state(R.SET_VRING_NUM, 0, 256),
                            _set(_addr(0), 3, f"qva:{SIZE - 16:#x}")),
    "ring across regions": (*_HANDSHAKE, mem_table(), _state(R.SET_VRING_NUM, 0, 256),
                            _set(_addr(0), 2, f"qva:{REGION_SIZE - 2048:#x}")),
    "log base overflow": (*_HANDSHAKE, log_base(4096, (1 << 64) - 1024)),  # CVE-2020-10722
    "log larger than its fd": (*_HANDSHAKE, log_base(1 << 30)),
    "inflight 0 queues": (*_HANDSHAKE, inflight(R.GET_INFLIGHT_FD, num_queues=0)),
    "inflight 65535 queues": (*_HANDSHAKE, inflight(R.SET_INFLIGHT_FD, 1 << 30, 0xFFFF, 128, ("inflight",))),  # CVE-2021-3839
    "inflight queue size 0x8001": (*_HANDSHAKE, inflight(R.GET_INFLIGHT_FD, queue_size=0x8001)),
    "inflight size lie": (*_HANDSHAKE, inflight(R.SET_INFLIGHT_FD, 1 << 40, fds=("memfd",))),
    "repeated GET_INFLIGHT_FD": (*_HANDSHAKE, *[inflight(R.GET_INFLIGHT_FD)] * 40),  # CVE-2020-10726
    "repeated SET_VRING_NUM": (*_STARTED, *[_state(R.SET_VRING_NUM, 0, 16)] * 40),
    "fd and memory exhaustion": (*_HANDSHAKE, *[mem_table(fds=("region0", "region1"))] * 30,  # CVE-2019-14818
                                 *[log_base(fds=("bigmemfd",))] * 30),
    "unclosed fds": (*_HANDSHAKE, *[Msg(r, 1, (), ("eventfd",) * 8) for r in (0, 26, 99, R.SET_OWNER, R.GET_FEATURES)],
                     Msg(R.SET_SLAVE_REQ_FD, NEED_REPLY, (), ("socket",))),  # CVE-2022-0669
    "reset mid-session": (*_STARTED, Msg(R.RESET_OWNER), Msg(R.RESET_DEVICE), *_STARTED[12:]),
    "session twice": (*SESSION, *SESSION),
}
