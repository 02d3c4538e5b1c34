"""`lab demo`: the main job end to end, narrated step by step with times.

A guest boots with a vhost-user-blk disk served by our back end; fio writes and verifies data
in it, and blocks stamped in the guest are verified bit for bit in the host's image file.
Everything started is torn down at the end, also on failure and Ctrl-C; the work directory
(back-end log and vhost-user trace, QEMU logs) is kept when something failed.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from images.builder import ensure_image
from lab.backends import BackendProcess
from lab.errors import LabError
from lab.guest import fio, stamps
from lab.guest.liveio import LiveIO
from lab.guest.stamps import StampWrite
from lab.migration_job import PRECOPY, Hop, JobConfig, MigrationJob, read_heavy
from lab.qemu.machine import (
    Machine,
    MachineConfig,
    create_raw_image,
    vhost_user_blk_disk,
)
from lab.virtio.workload import verify_image

MiB = 1 << 20
DISK_MIB = 256
QUEUES = 2
SERIAL = "lab-demo"
GUEST_MEM_MIB = 1024
SEED = 0xDE30
FIO_JOB_MIB = 32  # two jobs, each on its own range: [0, 64M)
STAMPS = (StampWrite(64 * MiB // stamps.BLOCK, 8192, 1), StampWrite(64 * MiB // stamps.BLOCK, 1639, 2, stride=5))


MIGRATION_DISK_MIB = 64


def migrate_under_io(image, workdir: Path) -> Hop:
    """A guest on our back end reads stamped blocks into buffers and writes new ones while it
    moves to a second QEMU (bandwidth limited for 4 passes); every buffer and block verified.
    The hop's timeline (PNG and JSON) is in `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    disk = create_raw_image(workdir / "disk.img", MIGRATION_DISK_MIB)
    job = MigrationJob(JobConfig(image, workdir, disk))
    try:
        job.boot()
        liveio = LiveIO(read_heavy(SEED))
        liveio.start(job.ssh, job.device())
        liveio.wait_for_more(job.ssh, 200, job.current.machine.scaled(60))
        hop = job.hop(PRECOPY, liveio, "lab demo: precopy, our back end")
        if hop.result.status == "completed" and not hop.result.problems:
            report = liveio.stop(job.ssh)
            hop.result.add_problems(report.problems())
            hop.result.add_problems([str(m) for m in liveio.verify_image(disk, report)[:3]])
    finally:
        problems = job.close()
        disk.unlink(missing_ok=True)
    if problems or not hop.result.ok:
        raise LabError(f"live migration failed ({hop.result.summary()}; timeline {hop.timeline_png}): "
                       + "; ".join((hop.result.problems + problems)[:3]))
    return hop


def keep_timeline(hop: Hop) -> Path:
    """Move the timeline (PNG and JSON) out of the work directory, which goes on success: the
    picture is the demo's result. Returns the PNG's new path."""
    kept = Path(tempfile.mkdtemp(prefix="lab-demo-timeline-"))
    for path in (hop.timeline_json, hop.timeline_png):
        shutil.move(path, kept / path.name)
    return kept / hop.timeline_png.name


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="the main job: a guest on our back end, verified I/O")
    parser.add_argument("--keep", action="store_true", help="keep the work directory even on success")
    parser.set_defaults(func=run)


class Narrator:
    """Prints each step with the time since the start and how long it took."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.facts: list[str] = []

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f} s] {text}", flush=True)

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[list[str]]:
        """Yields a list; what the step appends to it is printed as the step's result."""
        self.say(f"{title} ...")
        began = time.monotonic()
        result: list[str] = []
        try:
            yield result
        except BaseException as exc:
            reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            self.say(f"  {reason} after {time.monotonic() - began:.1f} s")
            raise
        self.say(f"  ok ({time.monotonic() - began:.1f} s){': ' if result else ''}{'; '.join(result)}")


def run(args: argparse.Namespace) -> int:
    story = Narrator()
    workdir = Path(tempfile.mkdtemp(prefix="lab-demo-"))
    backend: BackendProcess | None = None
    machine: Machine | None = None
    ok = False
    try:
        with story.step("guest image (built once, then cached)") as out:
            image = ensure_image(progress=lambda message: story.say(f"  {message}"))
            out.append(f"kernel {image.kernel_version}")
        with story.step("our vhost-user-blk back end") as out:
            disk = create_raw_image(workdir / "disk.img", DISK_MIB)
            backend = BackendProcess(
                kind="ours", socket=str(workdir / "vu.sock"), image=str(disk), log=workdir / "backend.log",
                queues=QUEUES, serial=SERIAL, extra=("--trace", str(workdir / "trace.jsonl")),
            ).start()
            out.append(f"pid {backend.pid} serving a {DISK_MIB} MiB image with {QUEUES} queues on {backend.socket}")
        with story.step("boot a guest with vhost-user-blk-pci on it") as out:
            machine = Machine(MachineConfig(
                "demo", image, workdir / "vm", mem_mib=GUEST_MEM_MIB,
                options=vhost_user_blk_disk("vu0", backend.socket, QUEUES),
            ))
            machine.launch()
            machine.wait_ready()
            dev = machine.ssh.disk_by_serial(SERIAL)
            queues = len(machine.ssh.run(f"ls /sys/block/{Path(dev).name}/mq").stdout.split())
            out.append(f"SSH up after {machine.boot_seconds:.1f} s ({machine.accel.name if machine.accel else '?'})")
            out.append(f"disk {dev} with serial {SERIAL}, {queues} queues")
        with story.step("fio in the guest: random 4 KiB writes, 2 jobs at depth 16, read back and verified") as out:
            job = {
                "filename": dev, "rw": "randwrite", "bs": "4k", "size": f"{FIO_JOB_MIB}M",
                "offset_increment": f"{FIO_JOB_MIB}M", "numjobs": 2, "iodepth": 16, "direct": 1,
                "ioengine": "libaio", "verify": "crc32c", "verify_fatal": 1, "group_reporting": 1,
            }
            result = fio.run(machine.ssh, {"verified": job}, timeout=600).job("verified")
            out.append(f"{result.write_iops:.0f} write IOPS, {result.write_bw_kib / 1024:.1f} MiB/s, verify ok")
            story.facts.append(f"fio: {2 * FIO_JOB_MIB} MiB random-written and verified at {result.write_iops:.0f} IOPS")
        with story.step("stamped blocks written in the guest, checked in the host's image") as out:
            stamps.install(machine.ssh)
            for stamp in STAMPS:
                stamps.write(machine.ssh, dev, stamp, SEED)
            first, count = STAMPS[0].first_lba, STAMPS[0].count
            mismatches = verify_image(disk, stamps.expected(STAMPS), SEED, first_lba=first, count=count)
            if mismatches:
                raise LabError(f"{len(mismatches)} stamped blocks wrong in the image, first: {mismatches[0]}")
            out.append(f"{count} blocks of 4 KiB, {STAMPS[1].count} of them rewritten: all bit-exact")
            story.facts.append(f"stamps: {count} blocks bit-exact in the host image")
        with story.step("live migration under verified I/O: precopy to a second QEMU with its own back end") as out:
            hop = migrate_under_io(image, workdir / "migration")
            png = keep_timeline(hop)
            out.append(hop.result.summary())
            out.append(f"timeline picture: {png}")
            story.facts.append(f"migration: {hop.result.summary()}; timeline {png}")
        with story.step("tear down") as out:
            machine.shutdown()
            backend.check_alive()
            backend.close()
            messages = sum(1 for _ in open(workdir / "trace.jsonl"))
            out.append(f"guest and back end stopped cleanly; {messages} vhost-user messages traced")
        ok = True
    finally:
        if machine is not None:
            machine.shutdown()
        if backend is not None:
            backend.stop()
        (workdir / "disk.img").unlink(missing_ok=True)
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"lab demo: logs kept in {workdir}", file=sys.stdout if ok else sys.stderr)
    story.say("demo passed: " + "; ".join(story.facts))
    return 0
