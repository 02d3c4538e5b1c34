"""The vhost-user back end: our Python counterpart of QEMU's libvhost-user.

Layers, each in its own module: protocol (wire format, strict decode), memory (memory table and
address translation), ring (device side of the split virtqueue), inflight and dirty_log (shared
regions QEMU hands over), server (socket, connection state machine, event loop), device (the
small trait a device implements) and the devices themselves (blk).

DeviceBroken lives here because every layer raises it and none should import another just for it.
"""


class DeviceBroken(Exception):
    """The front end or the guest violated the protocol; the device must stop touching guest
    memory for this connection. The message is the one log line that explains why."""
