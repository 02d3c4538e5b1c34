"""The small trait a device implements (like rust-vmm's VhostUserBackend).

A device declares its virtio features, queue count, config space and whether it wants inflight
tracking, and turns one request (device-readable and device-writable buffers) into a used
length. It never sees the vhost-user protocol, rings or guest addresses; the protocol side never
knows which device it serves.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass


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


class Device(abc.ABC):
    """What a vhost-user device provides to the protocol handler."""

    num_queues: int
    #: the device answers GET_CONFIG/SET_CONFIG (blk) instead of letting the front end build it
    has_config: bool = False
    #: requests may be resubmitted after a reconnect from the inflight region
    tracks_inflight: bool = False

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
    def handle(self, queue: int, request: Buffers) -> int:
        """Process one request; return the number of bytes written into request.writable.
        Raise DeviceBroken for a request the device cannot even parse."""

    def flush(self) -> None:
        """Make completed writes durable (called on shutdown)."""

    def close(self) -> None:
        """Release the device's resources (image file)."""
