"""The vhost-user front end + blk driver against real back ends (ours and qemu-storage-daemon).

Data is stamped (lab.virtio.workload) and checked through the device and in the image file.
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from lab.virtio import VirtioError
from lab.virtio.blk import (
    F_DISCARD,
    F_MQ,
    F_RO,
    F_WRITE_ZEROES,
    S_OK,
    SECTOR,
    T_IN,
    T_OUT,
    BlkDevice,
    BlkIOError,
    IoSlots,
    random_io,
)
from lab.virtio.device import bit
from lab.virtio.transport import F_EVENT_IDX, F_INDIRECT_DESC
from lab.virtio.vhost_user import PROTOCOL_F_INFLIGHT_SHMFD, VhostUserTransport
from lab.virtio.workload import fill, stamped, verify, verify_image

BS = 4096
PER = BS // SECTOR
SEED = 1234


def open_blk(backend, *, regions: int = 1, **options) -> BlkDevice:
    transport = VhostUserTransport(backend.socket, mem_size=32 << 20, timeout=5.0, regions=regions)
    try:
        return BlkDevice(transport, timeout=5.0, **options)
    except BaseException:
        transport.close()
        raise


@pytest.fixture
def blk(blk_backend) -> Iterator[BlkDevice]:
    device = open_blk(blk_backend, num_queues=2)
    yield device
    device.close()


def write_blocks(blk: BlkDevice, lba: int, count: int, generation: int, queue: int = 0) -> None:
    blk.write(lba * PER, stamped(lba, count, generation, SEED), queue)


def assert_blocks(blk: BlkDevice, lba: int, count: int, generation, queue: int = 0) -> None:
    assert verify(blk.read(lba * PER, count * PER, queue), lba, generation, SEED) == []


def test_handshake_and_config(blk, blk_backend):
    assert blk.capacity == os.path.getsize(blk_backend.image) // SECTOR
    assert blk.config.blk_size in (512, 4096)
    assert blk.has(F_MQ) and blk.config.num_queues == 2
    assert not blk.read_only


def test_write_read_verified_on_device_and_in_image(blk, blk_backend):
    write_blocks(blk, 3, 16, generation=1)
    assert_blocks(blk, 3, 16, 1)
    write_blocks(blk, 5, 2, generation=2)
    expected = {lba: (2 if lba in (5, 6) else 1) for lba in range(3, 19)}
    assert verify(blk.read(3 * PER, 16 * PER), 3, expected, SEED) == []
    blk.flush()
    assert verify_image(blk_backend.image, expected, SEED, first_lba=3, count=16) == []
    assert verify_image(blk_backend.image, None, SEED, first_lba=19, count=8) == []


def test_verification_can_fail(blk, blk_backend):
    write_blocks(blk, 0, 4, generation=1)
    bad = verify(blk.read(0, 4 * PER), 0, 2, SEED)
    assert [m.kind for m in bad] == ["stale"] * 4
    blk.flush()
    assert [m.kind for m in verify_image(blk_backend.image, 1, SEED, first_lba=1, count=4)] == ["zero"]


def test_scatter_gather_and_many_segments(blk):
    t = blk.transport
    sizes = [SECTOR, 3 * SECTOR, BS, 4 * SECTOR]  # 16 sectors = 2 blocks
    data = stamped(40, 2, 7, SEED)
    out = [t.alloc_dma(n) for n in sizes]
    offset = 0
    for buffer in out:
        buffer.view[:] = data[offset : offset + buffer.size]
        offset += buffer.size
    blk.writev(40 * PER, out)
    # more single-sector segments than seg_max: the driver must split into several requests
    count = max(blk.max_segments, 2) + 10
    ins = [t.alloc_dma(SECTOR) for _ in range(count)]
    blk.readv(40 * PER, ins)
    got = b"".join(bytes(b.view) for b in ins)
    assert got[: 2 * BS] == data
    assert got[2 * BS :] == bytes(len(got) - 2 * BS)
    for buffer in out + ins:
        t.free_dma(buffer)


def test_get_id(start_backend, backend_kind):
    backend = start_backend(backend_kind, serial="lab-serial-0042")
    blk = open_blk(backend)
    try:
        assert blk.get_id() == ("lab-serial-0042" if backend_kind == "ours" else "vhost_user_blk")
    finally:
        blk.close()


def test_out_of_range_is_ioerr(blk):
    with pytest.raises(BlkIOError):
        blk.read(blk.capacity, 1)
    with pytest.raises(BlkIOError):
        blk.read(blk.capacity - 4, 8)
    with pytest.raises(BlkIOError):
        blk.write(blk.capacity, bytes(SECTOR))
    assert_blocks(blk, 0, 1, None)  # the device still works


def test_read_only_refuses_writes(start_backend, backend_kind):
    backend = start_backend(backend_kind, read_only=True)
    blk = open_blk(backend)
    try:
        assert blk.read_only and blk.has(F_RO)
        with pytest.raises(BlkIOError):
            blk.write(0, stamped(0, 1, 1, SEED))
        assert_blocks(blk, 0, 1, None)
    finally:
        blk.close()
    assert verify_image(backend.image, None, SEED, count=1) == []


def _allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def test_discard_punches_holes(blk, blk_backend):
    if not blk.has(F_DISCARD):
        pytest.fail("back end does not offer DISCARD")
    write_blocks(blk, 256, 256, generation=1)  # 1 MiB at 1 MiB
    blk.flush()
    before = _allocated(blk_backend.image)
    assert before >= 1 << 20
    blk.discard([(256 * PER, 256 * PER)])
    blk.flush()
    assert _allocated(blk_backend.image) <= before - (1 << 20) + BS
    assert_blocks(blk, 256, 256, None)


@pytest.mark.parametrize("unmap", [False, True], ids=["zero", "unmap"])
def test_write_zeroes(blk, blk_backend, unmap):
    if not blk.has(F_WRITE_ZEROES):
        pytest.fail("back end does not offer WRITE_ZEROES")
    write_blocks(blk, 512, 64, generation=3)
    blk.write_zeroes([(520 * PER, 32 * PER)], unmap=unmap)
    blk.flush()
    expected = {lba: (None if 520 <= lba < 552 else 3) for lba in range(512, 576)}
    assert verify(blk.read(512 * PER, 64 * PER), 512, expected, SEED) == []
    assert verify_image(blk_backend.image, expected, SEED, first_lba=512, count=64) == []


def test_multi_queue(blk):
    write_blocks(blk, 100, 8, generation=1, queue=0)
    assert_blocks(blk, 100, 8, 1, queue=1)
    write_blocks(blk, 100, 4, generation=2, queue=1)
    expected = {lba: (2 if lba < 104 else 1) for lba in range(100, 108)}
    assert verify(blk.read(100 * PER, 8 * PER, 0), 100, expected, SEED) == []
    result = random_io(blk, T_IN, queues=(0, 1), depth=8, ios=2000)
    assert result.ios == 2000 and result.errors == 0


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
def test_random_writes_then_verify(blk_backend, event_idx):
    blk = open_blk(blk_backend, without=0 if event_idx else bit(F_EVENT_IDX))
    try:
        assert blk.has(F_EVENT_IDX) == event_idx
        span = 1024
        written: dict[int, int] = {}

        def stamp(buffer: memoryview, lba: int) -> None:
            written[lba] = 5
            fill(buffer, lba, 5, SEED)

        result = random_io(blk, T_OUT, depth=16, ios=3000, span_blocks=span, fill=stamp, seed=9)
        assert result.errors == 0
        assert verify(blk.read(0, span * PER), 0, written.get, SEED) == []
        blk.flush()
        assert verify_image(blk_backend.image, written.get, SEED, count=span) == []
        if event_idx:  # the device asked for fewer kicks than requests
            assert blk.queues[0].kicks < result.ios
    finally:
        blk.close()


def test_indirect_descriptors(blk):
    if not blk.has(F_INDIRECT_DESC):
        pytest.fail("back end does not offer INDIRECT_DESC")
    t = blk.transport
    buffers = [t.alloc_dma(BS) for _ in range(8)]
    for i, buffer in enumerate(buffers):
        fill(buffer.view, 60 + i, 4, SEED)
    blk.writev(60 * PER, buffers, indirect=True)
    for buffer in buffers:
        buffer.view[:] = bytes(BS)
    blk.readv(60 * PER, buffers, indirect=True)
    assert verify(b"".join(bytes(b.view) for b in buffers), 60, 4, SEED) == []
    for buffer in buffers:
        t.free_dma(buffer)


def test_indirect_refused_when_not_negotiated(blk_backend):
    blk = open_blk(blk_backend, without=bit(F_INDIRECT_DESC))
    try:
        buffer = blk.transport.alloc_dma(BS)
        with pytest.raises(VirtioError, match="indirect"):
            blk.readv(0, [buffer], indirect=True)
        blk.readv(0, [buffer])
    finally:
        blk.close()


def test_buffers_across_memory_regions(blk_backend):
    blk = open_blk(blk_backend, regions=2)
    try:
        memory = blk.transport.memory
        boundary = memory.regions[1].gpa
        out = memory.alloc(4 * BS, at=boundary - BS - SECTOR)  # 1.125 blocks before, the rest after
        back = memory.alloc(4 * BS, at=boundary + 8 * BS - 3 * SECTOR - 4 * BS)
        memory.write(out, stamped(70, 4, 6, SEED))
        blk.writev(70 * PER, [(out, 4 * BS)])
        blk.readv(70 * PER, [(back, 4 * BS)])
        assert verify(memory.read(back, 4 * BS), 70, 6, SEED) == []
        blk.flush()
        assert verify_image(blk_backend.image, 6, SEED, first_lba=70, count=4) == []
    finally:
        blk.close()


def test_reconnect_after_backend_restart(blk_backend):
    blk = open_blk(blk_backend, num_queues=2)
    try:
        write_blocks(blk, 10, 8, generation=1)
        blk.flush()
        blk_backend.restart()
        blk.transport.reconnect()
        assert_blocks(blk, 10, 8, 1)
        write_blocks(blk, 12, 2, generation=2, queue=1)
        expected = {lba: (2 if lba in (12, 13) else 1) for lba in range(10, 18)}
        assert verify(blk.read(10 * PER, 8 * PER), 10, expected, SEED) == []
    finally:
        blk.close()
    assert verify_image(blk_backend.image, expected, SEED, first_lba=10, count=8) == []


def test_inflight_requests_survive_backend_crash(blk_backend):
    """Kill -9 with a full queue in flight; with INFLIGHT_SHMFD the new back end resubmits."""
    blk = open_blk(blk_backend)
    try:
        if not blk.transport.protocol_features >> PROTOCOL_F_INFLIGHT_SHMFD & 1:
            pytest.skip(f"{blk_backend.kind} does not offer INFLIGHT_SHMFD")
        slots = IoSlots(blk, 0, 32, BS)
        for slot in range(32):
            fill(slots.buffers[slot].view, 200 + slot, 8, SEED)
            slots.submit(slot, T_OUT, (200 + slot) * PER)
        slots.kick()
        blk_backend.kill()
        blk_backend.start()
        blk.transport.reconnect()
        done: dict[int, int] = {}
        while len(done) < 32:
            completions = slots.reap(5.0)
            assert completions, f"only {len(done)} of 32 requests completed after the reconnect"
            done.update(completions)
        assert sorted(done) == list(range(32)) and set(done.values()) == {S_OK}
        assert_blocks(blk, 200, 32, 8)
        slots.close()
    finally:
        blk.close()


def test_fresh_connection_after_backend_restart(blk_backend):
    blk = open_blk(blk_backend)
    write_blocks(blk, 30, 4, generation=1)
    blk.close()
    blk_backend.restart()
    blk = open_blk(blk_backend)
    try:
        assert_blocks(blk, 30, 4, 1)
    finally:
        blk.close()


def test_bench_smoke(blk):
    result = random_io(blk, T_IN, depth=32, ios=5000)
    assert result.errors == 0 and result.iops > 1000
