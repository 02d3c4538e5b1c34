"""The fuzzer's side of the socket: symbolic messages, symbolic fds, and the probe that checks
the daemon answered (or hung up) after each message.

Cases are plain data (so they print, shrink and serialise into reproducers): a message's fields
are (struct format char, value) pairs where a value is an int or "qva:GPA" (the front end's
address of a guest-physical address, known only when the case runs); its fds are kind names
materialised afresh for each send.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from lab.fuzz.memory import SIZE, GuardedMemory
from lab.fuzz.target import TIMEOUT, Daemon, Finding
from lab.virtio.vhost_user import HEADER, MAX_FDS, Request

Value = int | str
Field = tuple[str, Value]
FD_KINDS = ("eventfd", "region0", "region1", "memfd", "bigmemfd", "pipe", "devnull", "socket", "inflight")
PROBE = Request.GET_QUEUE_NUM  # always answered, changes nothing
PROBE_TIMEOUT = 2 * TIMEOUT  # above the daemon's own 5 s limit for a message stalled half-way


@dataclass(frozen=True)
class Msg:
    request: int
    flags: int = 1
    fields: tuple[Field, ...] = ()
    fds: tuple[str, ...] = ()
    extra: bytes = b""  # appended to the packed fields
    cut: int = 0  # bytes dropped from the end of the payload
    declared: int | None = None  # a header size that lies about the payload

    def payload(self, memory: GuardedMemory) -> bytes:
        packed = b"".join(_pack(fmt, value, memory) for fmt, value in self.fields) + self.extra
        return packed[: max(0, len(packed) - self.cut)]


def _pack(fmt: str, value: Value, memory: GuardedMemory) -> bytes:
    if isinstance(value, str):  # "qva:GPA"
        value = memory.qva(int(value[4:], 0) % SIZE)
    width = struct.calcsize("<" + fmt)
    return struct.pack("<" + fmt, value & ((1 << 8 * width) - 1))


def _well_formed_probe(msg: Msg, memory: GuardedMemory) -> bool:
    return (msg.request == PROBE and msg.flags in (1, 9) and not msg.fds and not msg.payload(memory)
            and msg.declared in (None, 0))


class FdPool:
    """Fresh fds of each kind for one send (closed right after: the daemon got copies)."""

    def __init__(self, memory: GuardedMemory) -> None:
        self.memory = memory
        self.inflight = -1  # the last inflight region the daemon handed us
        self.kick = os.eventfd(0, os.EFD_CLOEXEC)  # kind "kick": the one the guest side signals
        self._temporary: list[int] = []

    def make(self, kinds: tuple[str, ...]) -> list[int]:
        return [self._make(kind) for kind in kinds]

    def _make(self, kind: str) -> int:
        if kind.startswith("region"):
            return self.memory.fds[int(kind[6:]) % len(self.memory.fds)]
        if kind == "inflight" and self.inflight >= 0:
            return self.inflight
        if kind == "kick":
            return self.kick
        fd = self._fresh(kind)
        self._temporary.append(fd)
        return fd

    @staticmethod
    def _fresh(kind: str) -> int:
        if kind == "eventfd":
            return os.eventfd(0, os.EFD_CLOEXEC)
        if kind in ("memfd", "bigmemfd", "inflight"):
            fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
            os.ftruncate(fd, 64 << 20 if kind == "bigmemfd" else 4096)
            return fd
        if kind == "pipe":
            r, w = os.pipe2(os.O_CLOEXEC)
            os.close(w)
            return r
        if kind == "socket":
            a, b = socket.socketpair()
            b.close()
            return a.detach()
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def sent(self) -> None:
        for fd in self._temporary:
            os.close(fd)
        self._temporary = []

    def close(self) -> None:
        self.sent()
        os.close(self.kick)
        if self.inflight >= 0:
            os.close(self.inflight)
            self.inflight = -1


class Wire:
    """One connection to the daemon; `closed` once the daemon hung up."""

    def __init__(self, path: str, memory: GuardedMemory) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(TIMEOUT)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise Finding(f"cannot connect to the daemon: {exc}") from None
        self.pool = FdPool(memory)
        self.memory = memory
        self.closed = False

    def send(self, msg: Msg) -> None:
        if self.closed:
            return
        payload = msg.payload(self.memory)
        size = len(payload) if msg.declared is None else msg.declared
        data = HEADER.pack(msg.request & 0xFFFFFFFF, msg.flags & 0xFFFFFFFF, size & 0xFFFFFFFF) + payload
        fds = self.pool.make(msg.fds)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))] if fds else []
        try:
            sent = self.sock.sendmsg([data], ancillary)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True
        except socket.timeout:
            raise Finding(f"the daemon stopped reading (request {msg.request})") from None
        finally:
            self.pool.sent()

    def probe(self, what: str, after: Msg | None = None) -> None:
        """Send the probe and read until its reply (the daemon answered everything before it) or
        the daemon hangs up; neither within PROBE_TIMEOUT is a hang. `after`: the message just
        sent, which is itself answered like the probe when it is a well-formed probe request."""
        self.send(Msg(PROBE))
        replies = 1 + (after is not None and _well_formed_probe(after, self.memory))
        while not self.closed and replies:
            if self._recv_one(what) == PROBE:
                replies -= 1

    def _recv_one(self, what: str) -> int | None:
        ready, _, _ = select.select([self.sock], [], [], PROBE_TIMEOUT)
        if not ready:
            raise Finding(f"hang: no answer and no hang-up within {PROBE_TIMEOUT}s after {what}")
        try:
            head, ancillary, _flags, _ = self.sock.recvmsg(HEADER.size, socket.CMSG_SPACE(MAX_FDS * 4))
        except (ConnectionResetError, socket.timeout):
            head, ancillary = b"", []
        fds = array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        if len(head) < HEADER.size:
            for fd in fds:
                os.close(fd)
            if head:
                raise Finding(f"a reply header of {len(head)} bytes after {what}")
            self.closed = True
            return None
        request, flags, size = HEADER.unpack(head)
        if flags != 0x5:
            raise Finding(f"reply to request {request} with flags {flags:#x} (QEMU accepts only 0x5)")
        try:
            self._recv_exact(size)
        except (ConnectionResetError, socket.timeout):
            self.closed = True
        for fd in fds:  # an inflight region is kept for a later SET_INFLIGHT_FD
            if self.pool.inflight >= 0:
                os.close(self.pool.inflight)
            self.pool.inflight = fd
        return request

    def _recv_exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionResetError
            data += chunk
        return data

    def kick(self) -> None:
        os.eventfd_write(self.pool.kick, 1)

    def close(self) -> None:
        self.sock.close()
        self.pool.close()


@contextlib.contextmanager
def case_session(daemon: Daemon) -> Iterator[tuple[Wire, GuardedMemory]]:
    """One case's connection and guarded memory. On a clean exit the canaries must be intact;
    both are closed whatever happens, then the daemon must settle (raises Finding)."""
    memory = GuardedMemory()
    wire = Wire(daemon.socket, memory)
    try:
        yield wire, memory
        if not memory.canaries_intact():
            raise Finding("a canary next to a memory region changed")
    finally:
        wire.close()
        memory.close()
    daemon.settle(closed_by_backend=wire.closed)
