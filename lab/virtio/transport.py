"""The ops table every transport implements (the counterpart of SPDK's virtio_dev_ops).

The driver core (device.py, ring.py, blk.py) only talks to a device through this interface, so
the same code drives a vhost-user back end from the host (vhost_user.py) and a virtio-pci device
from inside a guest (pci.py). Addresses handed to the device are *device addresses*: guest-physical
addresses for both transports; a transport translates them where its wire needs something else.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

# Device status bits (virtio 1.x, 2.1).
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 64
STATUS_FAILED = 128

# Transport-independent feature bits.
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33


@dataclass(frozen=True, slots=True)
class DmaBuffer:
    """Memory the device can reach: `addr` is the device address of `view[0]`."""

    addr: int
    view: memoryview

    @property
    def size(self) -> int:
        return len(self.view)


class Transport(abc.ABC):
    """How the driver core reaches one virtio device."""

    @abc.abstractmethod
    def device_features(self) -> int:
        """The feature bits the device offers (transport-internal bits already removed)."""

    @abc.abstractmethod
    def set_driver_features(self, features: int) -> None:
        """Record the accepted subset; it takes effect with FEATURES_OK."""

    @abc.abstractmethod
    def get_status(self) -> int: ...

    @abc.abstractmethod
    def set_status(self, status: int) -> None:
        """Write the status byte; 0 resets the device and waits until the reset is complete."""

    @abc.abstractmethod
    def config_generation(self) -> int:
        """Changes whenever the device changes its config space (constant where there is none)."""

    @abc.abstractmethod
    def read_config(self, offset: int, size: int) -> bytes: ...

    @abc.abstractmethod
    def write_config(self, offset: int, data: bytes) -> None: ...

    @abc.abstractmethod
    def num_queues(self) -> int:
        """How many virtqueues the device has at most."""

    @abc.abstractmethod
    def queue_max_size(self, index: int) -> int:
        """Largest ring size the device accepts for this queue (0: the queue does not exist)."""

    @abc.abstractmethod
    def setup_queue(self, index: int, size: int, desc: int, avail: int, used: int) -> None:
        """Tell the device the ring size and the device addresses of the three ring parts."""

    @abc.abstractmethod
    def enable_queue(self, index: int) -> None: ...

    @abc.abstractmethod
    def notify(self, index: int) -> None:
        """Kick: new buffers are available on this queue."""

    @abc.abstractmethod
    def alloc_dma(self, size: int, align: int = 4096) -> DmaBuffer:
        """Zeroed device-reachable memory, physically contiguous as seen by the device."""

    @abc.abstractmethod
    def free_dma(self, buffer: DmaBuffer) -> None: ...

    @abc.abstractmethod
    def wait(self, index: int, timeout: float) -> bool:
        """Sleep until the device may have used buffers on this queue, at most `timeout` s.

        True when an interrupt/call arrived. Transports without an interrupt source sleep
        briefly and return False; callers always re-poll the used ring either way.
        """

    def reset(self) -> None:
        self.set_status(0)

    @abc.abstractmethod
    def close(self) -> None:
        """Reset the device and release everything the transport holds."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
