"""A virtio device over any transport: reset, status sequence, feature negotiation, queues, config."""

from __future__ import annotations

from functools import partial

from . import VirtioError
from .ring import SplitQueue, ring_layout
from .transport import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    DmaBuffer,
    Transport,
)

CONFIG_READ_RETRIES = 100


def bit(n: int) -> int:
    return 1 << n


class VirtioDevice:
    """Brings a device from reset to DRIVER_OK and owns its queues."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.features = 0
        self.queues: list[SplitQueue] = []
        self._dma: list[DmaBuffer] = []

    def has(self, feature_bit: int) -> bool:
        return bool(self.features >> feature_bit & 1)

    def negotiate(self, wanted: int) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, accept offered & wanted (+VERSION_1), FEATURES_OK."""
        t = self.transport
        self.reset()
        t.set_status(STATUS_ACKNOWLEDGE)
        t.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        offered = t.device_features()
        if not offered & bit(F_VERSION_1):
            self._fail("the device does not offer VIRTIO_F_VERSION_1 (legacy-only devices are not supported)")
        features = offered & (wanted | bit(F_VERSION_1))
        t.set_driver_features(features)
        t.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        if not t.get_status() & STATUS_FEATURES_OK:
            self._fail(f"the device refused features {features:#x} (FEATURES_OK did not stick)")
        self.features = features
        return features

    def setup_queues(self, count: int, size: int = 128, indirect_max: int = 64) -> list[SplitQueue]:
        """Create and enable queues 0..count-1 of min(size, device maximum) entries each."""
        t = self.transport
        if count > t.num_queues():
            self._fail(f"{count} queues requested, the device has {t.num_queues()}")
        event_idx = self.has(F_EVENT_IDX)
        indirect = self.has(F_INDIRECT_DESC)
        for index in range(count):
            limit = t.queue_max_size(index)
            if limit == 0:
                self._fail(f"queue {index} does not exist on the device")
            if limit & (limit - 1):
                self._fail(f"queue {index}: the device's maximum size {limit} is not a power of two (split rings need one)")
            qsize = min(size, limit)
            qsize = 1 << (qsize.bit_length() - 1)  # a power of two <= both
            ring = self.alloc_dma(ring_layout(qsize)[2])
            tables = self.alloc_dma(qsize * indirect_max * 16) if indirect else None
            queue = SplitQueue(
                index, qsize, ring, partial(t.notify, index), partial(t.wait, index),
                event_idx=event_idx, indirect=tables, indirect_max=indirect_max,
            )
            t.setup_queue(index, qsize, queue.desc_addr, queue.avail_addr, queue.used_addr)
            t.enable_queue(index)
            self.queues.append(queue)
        return self.queues

    def driver_ok(self) -> None:
        t = self.transport
        t.set_status(t.get_status() | STATUS_DRIVER_OK)
        self.check_status()

    def check_status(self) -> None:
        status = self.transport.get_status()
        if status & STATUS_NEEDS_RESET:
            raise VirtioError(f"the device needs a reset (status {status:#x})")

    def read_config(self, offset: int, size: int) -> bytes:
        """A consistent snapshot: retried while the config generation changes under us."""
        t = self.transport
        for _ in range(CONFIG_READ_RETRIES):
            before = t.config_generation()
            data = t.read_config(offset, size)
            if t.config_generation() == before:
                return data
        raise VirtioError("the device config kept changing while being read")

    def write_config(self, offset: int, data: bytes) -> None:
        self.transport.write_config(offset, data)

    def reset(self) -> None:
        """Reset the device and drop every queue; all memory from alloc_dma returns to the transport."""
        self.transport.reset()
        self.queues = []
        for buffer in self._dma:
            self.transport.free_dma(buffer)
        self._dma = []
        self.features = 0

    def close(self) -> None:
        try:
            self.reset()
        finally:
            self.transport.close()

    def alloc_dma(self, size: int) -> DmaBuffer:
        """DMA memory for rings and request buffers that lives until the next reset()."""
        buffer = self.transport.alloc_dma(size, 4096)
        self._dma.append(buffer)
        return buffer

    def _fail(self, message: str) -> None:
        self.transport.set_status(self.transport.get_status() | STATUS_FAILED)
        raise VirtioError(message)
