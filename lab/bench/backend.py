"""`lab bench backend`: our vhost-user-blk back end against qemu-storage-daemon's export.

One host-side front end (lab.virtio over vhost-user, no guest) drives both back ends on the same
raw image: fully allocated (written with data, then fsynced so no writeback runs during the
measurements) and page-cache warm, so the numbers compare the back ends, not the disk. Each
back end kind runs as one process per queue count for the whole bench; every measurement is a
fresh front-end connection. Runs alternate between the kinds (and which kind goes first
alternates per repetition) so machine noise falls on both sides alike; rows report medians.
Queue depth is per queue. Peak RSS is VmHWM, reset before each run (clear_refs 5), so it is
the run's own peak; it includes the guest memory pages the back end touched (shared memfd).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from lab.backends import BACKEND_KINDS, BackendError, BackendProcess, backend_available
from lab.bench import emit, positive_int, progress
from lab.errors import LabError
from lab.virtio import VirtioError
from lab.virtio.blk import S_OK, SECTOR, T_IN, T_OUT, BlkDevice, IoSlots
from lab.virtio.vhost_user import VhostUserTransport

MiB = 1 << 20


@dataclass(frozen=True)
class Workload:
    name: str
    type_: int
    block_size: int
    depth: int  # per queue
    sequential: bool


WORKLOADS = (
    Workload("randread-4k-qd1", T_IN, 4096, 1, False),
    Workload("randread-4k-qd32", T_IN, 4096, 32, False),
    Workload("randwrite-4k-qd32", T_OUT, 4096, 32, False),
    Workload("seqread-1m-qd4", T_IN, MiB, 4, True),
)
QUEUE_COUNTS = (1, 2)
# minimum ours/qsd IOPS ratio, by (workload, queues)
TARGETS = {
    ("randread-4k-qd32", 1): 0.7,
    ("seqread-1m-qd4", 1): 0.9,
    ("seqread-1m-qd4", 2): 0.9,
}
GUEST_MEMORY = 16 * MiB  # room for the largest workload's buffers (2 queues x 4 x 1 MiB) and rings
IO_TIMEOUT = 10.0  # no completion for this long: the back end is stuck
MULTI_QUEUE_WAIT = 0.001  # one thread serves every queue: never sleep long on one while others have work
MIN_IMAGE = 16 * MiB
SCSI_IMAGE = 256 * MiB


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "backend", help="our vhost-user-blk back end vs qemu-storage-daemon, same front end and image"
    )
    parser.add_argument("--seconds", type=positive_float, default=1.0, help="length of each run in seconds (1)")
    parser.add_argument("--repeat", type=positive_int, default=5, help="runs per row and back end; rows show the median (5)")
    parser.add_argument("--image-size", type=image_size, default=1 << 30, metavar="SIZE",
                        help="raw image size, e.g. 256M, 1G (1G)")
    parser.add_argument("--no-scsi", dest="scsi", action="store_false",
                        help="skip the scsi rows (they boot a guest: ours vs QEMU's virtio-scsi, fio inside)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def image_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMG]?)(i?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size like 256M or 1G, got {text!r}")
    size = int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2).upper()]
    if size < MIN_IMAGE or size % MiB:
        raise argparse.ArgumentTypeError(f"image size must be a multiple of 1M and at least {MIN_IMAGE // MiB}M")
    return size


@dataclass(frozen=True)
class Sample:
    iops: float
    mb_s: float
    peak_rss_kib: int


def run(args: argparse.Namespace) -> int:
    for kind in BACKEND_KINDS:
        reason = backend_available(kind)
        if reason:
            raise LabError(f"bench backend needs both back ends: {reason}")
    workdir = Path(tempfile.mkdtemp(prefix="lab-bench-backend-"))
    backends: list[BackendProcess] = []
    ok = False
    try:
        image = workdir / "disk.img"
        progress(f"bench backend: writing a {args.image_size // MiB} MiB image {image}")
        create_warm_image(image, args.image_size)
        for kind in BACKEND_KINDS:
            for queues in QUEUE_COUNTS:
                backends.append(BackendProcess(
                    kind=kind, socket=str(workdir / f"{kind}{queues}.sock"), image=str(image),
                    log=workdir / f"{kind}{queues}.log", queues=queues,
                ).launch())
        for backend in backends:
            backend.wait_ready()
        samples = measure_all(backends, args.seconds, args.repeat)
        stop_checked(backends)
        ok = True
    finally:
        for backend in backends:
            backend.stop()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            (workdir / "disk.img").unlink(missing_ok=True)
            progress(f"bench backend: back end logs kept in {workdir}")
    result = summarize(samples, args)
    lines = table(result)
    if args.scsi:
        # vhost-user-scsi has no host-side reference back end: compare it with QEMU's own
        # virtio-scsi behind the same guest
        from lab.bench import guest_scsi

        result["scsi"] = guest_scsi.measure(args.seconds, args.repeat, SCSI_IMAGE)
        lines += ["", *guest_scsi.table(result["scsi"], "scsi: our vhost-user-scsi vs QEMU's virtio-scsi in a guest")]
    emit(result, args.json, lines)
    return 0


def create_warm_image(path: Path, size: int) -> None:
    """Write every byte (non-zero data, so nothing stays sparse), fsync, then read it all once."""
    chunk = os.urandom(MiB)
    try:
        with open(path, "wb") as image:
            for _ in range(size // MiB):
                image.write(chunk)
            image.flush()
            os.fsync(image.fileno())  # clean pages: no writeback competes with the first runs
        allocated = os.stat(path).st_blocks * 512
        if allocated < size:
            raise LabError(f"image {path}: only {allocated} of {size} bytes allocated")
        with open(path, "rb", buffering=0) as image:
            while image.read(8 * MiB):
                pass
    except OSError as exc:
        raise LabError(f"cannot create the bench image {path}: {exc.strerror}") from None


def measure_all(backends: list[BackendProcess], seconds: float, repeat: int) -> dict[tuple, list[Sample]]:
    """Samples by (workload name, queues, kind); kinds interleaved run by run."""
    by_key = {(b.kind, b.queues): b for b in backends}
    samples: dict[tuple, list[Sample]] = {}
    total = repeat * len(WORKLOADS) * len(QUEUE_COUNTS) * len(BACKEND_KINDS)
    done = 0
    for rep in range(repeat):
        kinds = BACKEND_KINDS if rep % 2 == 0 else BACKEND_KINDS[::-1]
        for workload in WORKLOADS:
            for queues in QUEUE_COUNTS:
                for kind in kinds:
                    backend = by_key[(kind, queues)]
                    sample = measure(backend, workload, queues, seconds, seed=rep)
                    samples.setdefault((workload.name, queues, kind), []).append(sample)
                    done += 1
                    progress(
                        f"[{done}/{total}] {kind:4} {workload.name} q{queues}: "
                        f"{sample.iops:9.0f} IOPS {sample.mb_s:8.1f} MB/s peak RSS {sample.peak_rss_kib // 1024} MiB"
                    )
    return samples


def measure(backend: BackendProcess, workload: Workload, queues: int, seconds: float, seed: int) -> Sample:
    """One run: a fresh front-end connection, `seconds` of `workload` on `queues` queues."""
    backend.check_alive()
    backend.reset_peak_memory()
    what = f"{backend.kind} back end, {workload.name} on {queues} queue(s)"
    try:
        transport = VhostUserTransport(backend.socket, mem_size=GUEST_MEMORY, timeout=IO_TIMEOUT)
        try:
            blk = BlkDevice(transport, num_queues=queues, timeout=IO_TIMEOUT)
        except BaseException:
            transport.close()
            raise
        try:
            ios, errors, elapsed = drive(blk, workload, queues, seconds, seed)
            peak = backend.memory_kib()["VmHWM"]
        finally:
            blk.close()
    except (VirtioError, ConnectionError) as exc:
        raise BackendError(f"{what}: {exc}\n{backend.log_tail(10)}") from None
    if errors:
        raise BackendError(f"{what}: {errors} of {ios} requests failed\n{backend.log_tail(10)}")
    iops = ios / elapsed
    return Sample(iops, iops * workload.block_size / 1e6, peak)


def drive(blk: BlkDevice, workload: Workload, queues: int, seconds: float, seed: int) -> tuple[int, int, float]:
    """Keep `depth` requests in flight on each queue for `seconds`: (completed, failed, elapsed)."""
    per_block = workload.block_size // SECTOR
    blocks = blk.capacity // per_block
    slots: list[IoSlots] = []
    try:
        for q in range(queues):
            slots.append(IoSlots(blk, q, workload.depth, workload.block_size))
        picks = [_offsets(workload, blocks, q, queues, seed) for q in range(queues)]
        lanes = list(zip(slots, picks))
        for s, pick in lanes:
            for slot in range(workload.depth):
                s.submit(slot, workload.type_, pick() * per_block)
            s.kick()
        wait = IO_TIMEOUT if queues == 1 else MULTI_QUEUE_WAIT
        ios = errors = 0
        start = last_progress = time.perf_counter()
        deadline = start + seconds
        while True:
            for s, pick in lanes:
                completions = s.reap(wait)
                if not completions:
                    continue
                for slot, status in completions:
                    ios += 1
                    errors += status != S_OK
                    s.submit(slot, workload.type_, pick() * per_block)
                s.kick()
                last_progress = time.perf_counter()
            now = time.perf_counter()
            if now >= deadline:
                break
            if now - last_progress > IO_TIMEOUT:
                raise VirtioError(f"no completion for {IO_TIMEOUT}s after {ios} requests")
        elapsed = now - start
        _drain(slots)  # the next run starts on a quiet back end
        return ios, errors, elapsed
    finally:
        for s in slots:
            s.close()


def _offsets(workload: Workload, blocks: int, queue: int, queues: int, seed: int) -> Callable[[], int]:
    """Next block index: uniform random (same sequence for both back ends), or one sequential
    stream per queue, each starting in its own part of the image."""
    if workload.sequential:
        position: Iterator[int] = itertools.count(queue * blocks // queues)
        return lambda: next(position) % blocks
    return functools.partial(random.Random(seed * 256 + queue).randrange, blocks)


def _drain(slots: list[IoSlots]) -> None:
    deadline = time.monotonic() + IO_TIMEOUT
    for s in slots:
        while s.queue.in_flight:
            s.reap(max(deadline - time.monotonic(), 0))
            if time.monotonic() >= deadline:
                raise VirtioError(f"{s.queue.in_flight} requests still in flight after {IO_TIMEOUT}s")


def stop_checked(backends: list[BackendProcess]) -> None:
    """Stop every back end; a crash or a traceback in a log fails the bench."""
    for backend in backends:
        backend.check_alive()
    for backend in backends:
        backend.close()


def summarize(samples: dict[tuple, list[Sample]], args: argparse.Namespace) -> dict:
    rows = []
    for workload in WORKLOADS:
        for queues in QUEUE_COUNTS:
            sides = {kind: _side(samples[(workload.name, queues, kind)]) for kind in BACKEND_KINDS}
            ratio = round(sides["ours"]["iops"] / sides["qsd"]["iops"], 3) if sides["qsd"]["iops"] else 0.0
            target = TARGETS.get((workload.name, queues))
            rows.append({
                "workload": workload.name,
                "op": "read" if workload.type_ == T_IN else "write",
                "pattern": "sequential" if workload.sequential else "random",
                "block_size": workload.block_size,
                "depth_per_queue": workload.depth,
                "queues": queues,
                **sides,
                "ratio": ratio,
                "target": target,
                "meets_target": None if target is None else ratio >= target,
            })
    return {
        "bench": "backend",
        "seconds_per_run": args.seconds,
        "repeat": args.repeat,
        "image_size": args.image_size,
        "qsd_version": _qsd_version(),
        "rows": rows,
        "targets_met": all(row["meets_target"] is not False for row in rows),
    }


def _side(runs: list[Sample]) -> dict:
    return {
        "iops": round(statistics.median(s.iops for s in runs), 1),
        "mb_s": round(statistics.median(s.mb_s for s in runs), 2),
        "peak_rss_kib": max(s.peak_rss_kib for s in runs),
        "iops_runs": [round(s.iops, 1) for s in runs],
    }


def _qsd_version() -> str:
    try:
        out = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.stdout.splitlines()[0].strip() if out.stdout else "?"


def table(result: dict) -> list[str]:
    head = (f"{'workload':18} {'q':>1} {'ours IOPS':>10} {'qsd IOPS':>10} {'ours MB/s':>9} {'qsd MB/s':>9} "
            f"{'ours RSS':>8} {'qsd RSS':>8} {'ratio':>6}  target")
    lines = [
        f"back ends on a {result['image_size'] // MiB} MiB raw image, {result['seconds_per_run']} s per run, "
        f"median of {result['repeat']}; depth is per queue; RSS = peak (VmHWM) in MiB; ratio = ours/qsd IOPS",
        f"reference: {result['qsd_version']}",
        head,
        "-" * len(head),
    ]
    for row in result["rows"]:
        ours, qsd = row["ours"], row["qsd"]
        verdict = "" if row["target"] is None else f">= {row['target']} {'ok' if row['meets_target'] else 'MISSED'}"
        lines.append(
            f"{row['workload']:18} {row['queues']:>1} {ours['iops']:>10.0f} {qsd['iops']:>10.0f} "
            f"{ours['mb_s']:>9.1f} {qsd['mb_s']:>9.1f} {ours['peak_rss_kib'] / 1024:>8.1f} "
            f"{qsd['peak_rss_kib'] / 1024:>8.1f} {row['ratio']:>6.2f}  {verdict}"
        )
    lines.append("all targets met" if result["targets_met"] else "some targets MISSED")
    return lines
