"""Live migration under verified I/O: scenarios that a broken implementation cannot pass.

Each guest runs the live I/O agent (lab/guest/liveio_agent.py) on its migrated disk: reads of
stamped blocks into a ring of buffers held in guest memory (the device writes guest RAM all the
time; every buffer is verified after its read and again before reuse) and writes of stamped
blocks of rising generations from buffers filled ahead. A migration counts as good only if QEMU
completed it, the destination runs, the source is in postmigrate, the back ends logged no
trouble, the guest kept doing I/O on the destination, and every buffer and block verified (in
the guest and in the host's image). The fault flags prove the checks: without dirty logging
the buffers the device filled during precopy arrive stale; without userfaultfd registration
the device reads guest pages that never arrived in postcopy.
"""

from __future__ import annotations

import dataclasses

import pytest

from fixtures.migration import JobFactory, assert_good, landed, stale_held, start_io, verify
from lab.backends import SCSI_KIND, backend_available
from lab.migration_job import (
    POSTCOPY,
    PRECOPY,
    read_heavy,
    write_heavy,
)
from lab.vhost_user import postcopy

pytestmark = [pytest.mark.migration, pytest.mark.boot]

SEED = 0x316
READ_HEAVY = read_heavy(SEED)
WRITE_HEAVY = write_heavy(SEED)

needs_userfaultfd = pytest.mark.skipif(postcopy.probe() is not None, reason=f"no userfaultfd: {postcopy.probe()}")


@pytest.mark.parametrize("kind", ["ours", "qsd"])
def test_precopy_under_read_heavy_io(kind: str, migration_job: JobFactory) -> None:
    """Bandwidth-limited precopy over several passes while the device fills guest buffers."""
    job = migration_job(kind)
    liveio = start_io(job, READ_HEAVY)
    hop = job.hop(PRECOPY, liveio, f"precopy, {kind} back end")
    report = verify(job, liveio, hop)
    assert_good(hop, "precopy")
    # a loaded host may converge before all the planned passes; one dirty-log sync while the
    # guest ran is the least that makes this a live migration
    assert hop.result.dirty_sync_count >= 2, hop.result.summary()
    assert report is not None and report.reads > 1000 and report.writes > 0


@pytest.mark.slow
def test_no_dirty_log_is_detected_every_time(migration_job: JobFactory) -> None:
    """With the device's buffer writes left out of the dirty log, buffers filled during precopy
    reach the destination stale: the verification must catch it after each of 3 migrations of
    the same guest (one agent throughout: each hop must add stale buffers of its own)."""
    job = migration_job("ours", faults=("no-dirty-log",))
    liveio = start_io(job, READ_HEAVY)
    stale_before = 0
    for attempt in range(1, 4):
        hop = job.hop(PRECOPY, liveio, f"precopy with --fault no-dirty-log, attempt {attempt}")
        stale = stale_held(job, liveio, hop)
        assert stale > stale_before, f"attempt {attempt}: no new stale buffers: {hop.result.summary()}"
        stale_before = stale
    report = liveio.stop(job.ssh)
    assert any(m["where"] == "held" for m in report.mismatches), report.mismatches[:3]


@needs_userfaultfd
def test_postcopy_under_write_heavy_io(migration_job: JobFactory) -> None:
    job = migration_job("ours")
    liveio = start_io(job, WRITE_HEAVY)
    hop = job.hop(POSTCOPY, liveio, "postcopy, our back end")
    report = verify(job, liveio, hop)
    assert_good(hop, "postcopy")
    assert report is not None and report.writes > 1000
    assert hop.result.postcopy_requests > 0
    # the device itself met pages that had not arrived and waited for them (the point of postcopy
    # support in the back end, and what the fault flag above takes away)
    assert sum(hop.result.backend_faults.values()) > 0, hop.result.summary()


@needs_userfaultfd
@pytest.mark.slow
@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_no_postcopy_register_is_detected(attempt: int, migration_job: JobFactory) -> None:
    """Without registering guest memory with userfaultfd the device reads pages that have not
    arrived (the slow background stream of POSTCOPY leaves write buffers missing for seconds):
    it sees zeros, and its access puts a page into the memfd that QEMU then cannot place; the
    migration or the verification must fail, in each of 3 attempts."""
    job = migration_job("ours", faults=("no-postcopy-register",))
    liveio = start_io(job, WRITE_HEAVY)
    hop = job.hop(POSTCOPY, liveio, f"postcopy with --fault no-postcopy-register, attempt {attempt}")
    verify(job, liveio, hop)
    assert not hop.result.ok, f"a back end that ignores missing pages passed: {hop.result.summary()}"


@pytest.mark.slow
def test_ping_pong(migration_job: JobFactory) -> None:
    """A to B and back, three times, under one agent's I/O: every buffer re-verified after each
    landing, every block and write of all hops verified at the end."""
    job = migration_job("ours")
    liveio = start_io(job, READ_HEAVY)
    for hop_number in range(1, 7):
        hop = job.hop(dataclasses.replace(PRECOPY, passes=2), liveio, f"ping-pong hop {hop_number}")
        landed(job, liveio, hop)
        assert_good(hop, "precopy")
    report = verify(job, liveio, hop)
    assert_good(hop, "precopy")
    assert report is not None and report.reads > 6 * READ_HEAVY.slots


def test_scsi_precopy(migration_job: JobFactory) -> None:
    if backend_available(SCSI_KIND):
        pytest.skip(backend_available(SCSI_KIND))
    job = migration_job(SCSI_KIND)
    liveio = start_io(job, READ_HEAVY)
    hop = job.hop(PRECOPY, liveio, "precopy, our vhost-user-scsi")
    verify(job, liveio, hop)
    assert_good(hop, "precopy")


def test_cancel_keeps_the_source_running(migration_job: JobFactory) -> None:
    job = migration_job("ours")
    source = job.current.name
    liveio = start_io(job, READ_HEAVY)
    hop = job.hop(dataclasses.replace(PRECOPY, cancel=True, passes=2), liveio, "cancelled precopy")
    verify(job, liveio, hop)
    assert job.current.name == source
    assert_good(hop, "cancelled")


@needs_userfaultfd
@pytest.mark.xfail(strict=True, reason="QEMU 7.2 + qemu-storage-daemon: in postcopy QEMU ends the ADD_MEM_REG "
                   "sequence with a message without an fd, libvhost-user panics (vu_panic: ADD_MEM_REG received "
                   "0 fds) and the destination device is dead although QEMU may report completed")
def test_postcopy_with_qsd(migration_job: JobFactory) -> None:
    job = migration_job("qsd", expect_trouble=True)
    liveio = start_io(job, WRITE_HEAVY)
    hop = job.hop(POSTCOPY, liveio, "postcopy, qemu-storage-daemon")
    verify(job, liveio, hop)
    assert_good(hop, "postcopy")
