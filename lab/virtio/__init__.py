"""A userspace virtio driver: split rings, device setup, blk requests, verifiable workloads.

Standard library only: this package is copied into guests and run there with a bare python3.
Modules import each other relatively so the copy works under any package name.
One core (ring.py, device.py, blk.py) runs over interchangeable transports (transport.py).
"""


class VirtioError(Exception):
    """The device or the driver's input is not usable; the message is one clear line."""


class QueueFull(VirtioError):
    """A request needs more free descriptors than the queue has right now."""


class DeviceTimeout(VirtioError):
    """The device did not answer within the deadline."""
