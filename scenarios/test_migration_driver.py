"""Live migration while our userspace virtio driver, inside the guest, drives the migrated disk.

The driver (labvirtio.pyz, lab/virtio) takes the vhost-user-blk device from the kernel and keeps
random reads and writes of stamped blocks in flight on two queues, detached from SSH. Its rings,
request headers and data buffers live in guest hugepages: the device writes guest memory all
the time (read data, status bytes, used rings) and only our back end's dirty log tells QEMU
which pages that touched. Every read is verified against its stamp when it completes. Across a
precopy migration the driver must keep going on the destination with nothing wrong, and the
host's image must hold exactly the stamps it reports writing. Without dirty logging of data
buffers (--fault no-dirty-log) the reads that the source back end completed after their
buffer's page last went over, and that the guest picks up on the destination, arrive stale:
the driver's verification must catch that on every hop.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from fixtures.migration import JobFactory
from lab.errors import LabError
from lab.guest.driver import DetachedIo, GuestDriver
from lab.migration_job import PRECOPY, Hop, MigrationJob
from lab.virtio.engine import IoCounters, IoReport
from lab.virtio.workload import verify_image

pytestmark = [pytest.mark.migration, pytest.mark.driver, pytest.mark.boot]

SEED = 0x6D1
BLOCK = 4096
SPAN = range(1024, 1024 + 2048)  # stamped with generation 1 before the run, which writes generation 2
HUGEPAGES = 16  # the run needs 7: rings and headers of two queues, 32 read and 32 write buffers each
# Mostly reads: the buffers the device fills are what the dirty log must carry over; the
# writes give the host's image something to check.
IO = {"rw": "randrw", "rwmix_read": 80, "bs": BLOCK, "qd": 32, "queues": 2, "first_block": SPAN.start,
      "blocks": len(SPAN), "generation": 2, "prior": 1, "seed": SEED, "verify": True}
WARMUP_IOS = 300  # before the migration: every buffer slot in use
AFTER_IOS = 300  # on the new side: the driver and its device work there
ALIVE_SECONDS = 60.0  # base, scaled by the accelerator
FAULT_HOPS = 3

Started = tuple[MigrationJob, DetachedIo]


@pytest.fixture
def driver_job(migration_job: JobFactory, labvirtio_zipapp: Path) -> Callable[..., Started]:
    """A booted migration job whose guest runs the driver on the migrated disk, warmed up."""

    def start(faults: tuple[str, ...] = ()) -> Started:
        job = migration_job("ours", faults=faults)
        driver = GuestDriver.install(job.ssh, labvirtio_zipapp, hugepages=HUGEPAGES)
        bdf = driver.function_of(job.device())
        fill = driver.io(bdf, rw="write", bs=BLOCK, qd=16, queues=2, ios=len(SPAN), first_block=SPAN.start,
                         blocks=len(SPAN), generation=1, seed=SEED, verify=True)
        assert fill.errors == 0 and fill.written == [[SPAN.start, len(SPAN)]], fill
        run = driver.start_io(bdf, **IO)
        run.wait_for_more(job.ssh, WARMUP_IOS, job.current.machine.scaled(ALIVE_SECONDS))
        return job, run

    return start


def keeps_going(job: MigrationJob, run: DetachedIo, hop: Hop) -> IoCounters | None:
    """The driver's counters once it did AFTER_IOS more requests on the guest's new side; a
    problem on the hop (and None) if it does not."""
    if hop.result.status != "completed":
        return None
    try:
        return run.wait_for_more(job.ssh, AFTER_IOS, job.current.machine.scaled(ALIVE_SECONDS))
    except LabError as exc:
        hop.result.add_problems([f"guest driver after the migration: {exc}"])
        return None


def finish(job: MigrationJob, run: DetachedIo, hop: Hop) -> IoReport | None:
    """Stop the driver and add to the hop's problems everything its report and the host's image
    show wrong; the report, or None when the driver had none."""
    try:
        report = run.stop(job.ssh, job.current.machine.scaled(120.0))
    except LabError as exc:
        hop.result.add_problems([f"guest driver: {exc}"])
        return None
    if report.errors:
        hop.result.add_problems([f"guest driver: {report.errors} requests failed"])
    if report.verify_errors:
        hop.result.add_problems([f"guest driver: {report.verify_errors} reads verified wrong, first: "
                                 + "; ".join(report.mismatches[:3])])
    expected = dict.fromkeys(SPAN, 1)
    for first, count in report.written:
        expected.update(dict.fromkeys(range(first, first + count), 2))
    image = verify_image(job.config.disk, expected, SEED, block_size=BLOCK, first_lba=SPAN.start, count=len(SPAN))
    if image:
        hop.result.add_problems([f"{len(image)} blocks wrong in the image, first: {image[0]}"])
    return report


def record(test_dir: Path, **facts: object) -> None:
    """What the run saw, kept with the test's artifacts."""
    text = json.dumps(facts, default=lambda value: value.to_json(), indent=1)
    (test_dir / "driver-io.json").write_text(text)


def test_precopy_under_driver_io(driver_job: Callable[..., Started], test_dir: Path) -> None:
    job, run = driver_job()
    before = run.progress(job.ssh)
    hop = job.hop(PRECOPY, None, "precopy under the in-guest userspace driver")
    after = keeps_going(job, run, hop)
    report = finish(job, run, hop)
    record(test_dir, before=before, after=after, migration=hop.result.summary(), report=report)
    assert hop.result.ok, f"{hop.result.summary()}\n  " + "\n  ".join(hop.result.problems)
    # a loaded host may converge before all the planned passes; one dirty-log sync while the
    # guest ran is the least that makes this a live migration
    assert hop.result.mode == "precopy" and hop.result.dirty_sync_count >= 2, hop.result.summary()
    assert before is not None and after is not None and report is not None
    assert report.ios >= after.ios >= before.ios + AFTER_IOS
    assert report.verify_checked == report.reads and report.verify_unchecked == 0, report  # every read verified
    assert report.writes > 0 and all(n > 0 for n in report.per_queue), report


@pytest.mark.slow
def test_no_dirty_log_is_detected_every_time(driver_job: Callable[..., Started], test_dir: Path) -> None:
    """With the device's buffer writes left out of the dirty log, each hop must add stale reads
    that the driver catches on the destination; the writes (the device only reads their
    buffers) still reach the image intact."""
    job, run = driver_job(faults=("no-dirty-log",))
    seen = run.progress(job.ssh)
    assert seen is not None and seen.verify_errors == 0, f"wrong reads before any migration: {seen}"
    history = [seen]
    for attempt in range(1, FAULT_HOPS + 1):
        hop = job.hop(PRECOPY, None, f"precopy with --fault no-dirty-log under the driver, attempt {attempt}")
        assert hop.result.status == "completed", hop.result.summary()
        now = keeps_going(job, run, hop)
        assert now is not None, hop.result.problems
        history.append(now)
        assert now.verify_errors > seen.verify_errors, f"attempt {attempt}: stale buffers went unnoticed: {history}"
        seen = now
    report = finish(job, run, hop)
    record(test_dir, history=history, report=report, problems=hop.result.problems)
    assert report is not None and report.verify_errors >= seen.verify_errors, report
    assert report.mismatches and report.errors == 0, report
    assert not [p for p in hop.result.problems if "image" in p], hop.result.problems
