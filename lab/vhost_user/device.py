"""The small trait a device implements (like rust-vmm's VhostUserBackend).

A device declares its virtio features, queue count, config space and whether it wants inflight
tracking, and turns one request (device-readable and device-writable buffers) into a used
length. It never sees the vhost-user protocol, rings or guest addresses; the protocol side never
knows which device it serves.

Devices that report events (virtio-scsi's event queue) hold requests: handle() returns None and
the ring keeps the buffers; later the device fills the oldest held one through the Completer the
connection attached. A device with input of its own (an admin socket) lists it in watch().
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Protocol


class ConfigRejected(Exception):
    """A config-space write the device does not accept (answered as a failure, not fatal)."""


@dataclass
class Buffers:
    """One request as the device sees it: the chain's buffers in order, as views of guest memory."""

    readable: list[memoryview]
    writable: list[memoryview]

    @staticmethod
    def total(views: list[memoryview]) -> int:
        return sum(len(v) for v in views)

    @staticmethod
    def gather(views: list[memoryview], offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the concatenated views (short if they end earlier)."""
        return b"".join(bytes(v) for v in Buffers.slice(views, offset, size))

    @staticmethod
    def scatter(views: list[memoryview], offset: int, data: bytes) -> int:
        """Copy data into the concatenated views from offset on; returns the bytes written."""
        pos = 0
        for view in Buffers.slice(views, offset, len(data)):
            view[:] = data[pos : pos + len(view)]
            pos += len(view)
        return pos

    @staticmethod
    def slice(views: list[memoryview], offset: int, size: int) -> list[memoryview]:
        """Views of bytes [offset, offset+size) of the concatenated views, without copying."""
        out = []
        for v in views:
            n = len(v)
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, size)
            out.append(v[offset : offset + take] if take != n else v)
            size -= take
            offset = 0
            if not size:
                break
        return out


class Completer(Protocol):
    """What a connection offers a device for requests it held."""

    def complete_held(self, queue: int, fill: Callable[[Buffers], int]) -> bool:
        """Fill the oldest held request of `queue` (fill returns the used length) and complete
        it; False when the queue holds none or is not running."""


class Device(abc.ABC):
    """What a vhost-user device provides to the protocol handler."""

    num_queues: int
    #: the device answers GET_CONFIG/SET_CONFIG (blk) instead of letting the front end build it
    has_config: bool = False
    #: requests may be resubmitted after a reconnect from the inflight region
    tracks_inflight: bool = False
    #: virtio bits a front end may ack although they were never offered; they are ignored.
    #: (QEMU's vhost-user-scsi forwards the guest's whole feature set, bits it emulates itself
    #: included; vhost-user-blk filters them.)
    foreign_features: int = 0

    @abc.abstractmethod
    def features(self) -> int:
        """Device-specific virtio feature bits (the transport adds the ring and vhost bits)."""

    def set_features(self, features: int) -> None:
        """The acked virtio features, before any request arrives."""

    def get_config(self, offset: int, size: int) -> bytes:
        raise ConfigRejected("device has no config space")

    def set_config(self, offset: int, data: bytes) -> None:
        raise ConfigRejected("device has no writable config space")

    @abc.abstractmethod
    def handle(self, queue: int, request: Buffers) -> int | None:
        """Process one request; return the number of bytes written into request.writable, or
        None to hold it for Completer.complete_held. Held requests complete first in, first out,
        and a queue that holds one holds every later one too (so a stopped ring can hand them
        back by rewinding). Raise DeviceBroken for a request the device cannot even parse."""

    def attach(self, completer: Completer | None) -> None:
        """A front end connected (its completer) or went away (None)."""

    def watch(self) -> list[tuple[Any, Callable[[], None]]]:
        """(file object, callback) pairs the server's loop watches for reading for the device."""
        return []

    def flush(self) -> None:
        """Make completed writes durable (called on shutdown)."""

    def close(self) -> None:
        """Release the device's resources (image file)."""
