"""`lab bench guest-blk`: fio in a guest on two vhost-user-blk disks, ours against QSD.

One guest, two extra disks of the same size: one served by our back end, one by
qemu-storage-daemon, each image fully written and page-cache warm (so the numbers compare the
back ends, not the host disk). fio runs the same job on each disk in turn, and which disk goes
first alternates per repetition so machine noise falls on both alike; rows report medians.
Under TCG the guest itself is a big part of every number: compare the ratio, not the IOPS.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from images.builder import ensure_image
from lab.backends import BACKEND_KINDS, BackendProcess, backend_available
from lab.bench import emit, positive_int, progress
from lab.bench.backend import create_warm_image, image_size, positive_float
from lab.errors import LabError
from lab.guest import fio
from lab.guest.ssh import GuestSSH
from images import ImageInfo
from lab.qemu.machine import Machine, MachineConfig, Option, vhost_user_blk_disk

MiB = 1 << 20
QUEUES = 2
GUEST_MEM_MIB = 1024
OURS_SERIAL = "bench-ours"
WORKLOADS: dict[str, dict[str, object]] = {
    "randread-4k-qd1": {"rw": "randread", "bs": "4k", "iodepth": 1},
    "randread-4k-qd32": {"rw": "randread", "bs": "4k", "iodepth": 32},
    "randwrite-4k-qd32": {"rw": "randwrite", "bs": "4k", "iodepth": 32},
    "seqread-1m-qd4": {"rw": "read", "bs": "1M", "iodepth": 4},
}
Workloads = Mapping[str, Mapping[str, object]]
Samples = dict[tuple[str, str], list[dict[str, float]]]  # (workload, side) -> runs


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("guest-blk", help="fio in a guest: our vhost-user-blk back end vs QSD")
    parser.add_argument("--seconds", type=positive_float, default=5.0, help="length of each fio run (5)")
    parser.add_argument("--repeat", type=positive_int, default=2, help="runs per workload and back end; median (2)")
    parser.add_argument("--image-size", type=image_size, default=256 * MiB, metavar="SIZE",
                        help="size of each raw image, e.g. 256M, 1G (256M)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for kind in BACKEND_KINDS:
        reason = backend_available(kind)
        if reason:
            raise LabError(f"bench guest-blk needs both back ends: {reason}")
    image = ensure_image(progress=progress)
    backends: dict[str, BackendProcess] = {}
    with bench_dir("guest-blk") as workdir, contextlib.ExitStack() as stack:
        for kind in BACKEND_KINDS:
            disk = workdir / f"{kind}.img"
            progress(f"bench guest-blk: writing a {args.image_size // MiB} MiB image for {kind}")
            create_warm_image(disk, args.image_size)
            backends[kind] = BackendProcess(
                kind=kind, socket=str(workdir / f"{kind}.sock"), image=str(disk), log=workdir / f"{kind}.log",
                queues=QUEUES, serial=OURS_SERIAL if kind == "ours" else None,
            )
            stack.callback(backends[kind].stop)
            backends[kind].start()
        options = [opt for kind, b in backends.items() for opt in vhost_user_blk_disk(f"vu-{kind}", b.socket, QUEUES)]
        machine = stack.enter_context(boot_guest("guest-blk", image, workdir, options))
        devices = {kind: machine.ssh.disk_by_serial(b.guest_serial) for kind, b in backends.items()}
        samples = measure_all(machine.ssh, devices, WORKLOADS, args.seconds, args.repeat,
                              check=lambda kind: backends[kind].check_alive())
        accel = machine.accel.name if machine.accel else "?"
        machine.shutdown()
        for backend in backends.values():
            backend.check_alive()
            backend.close()
    result = summarize(samples, args, accel)
    emit(result, args.json, table(result, f"{QUEUES}-queue vhost-user-blk disks"))
    return 0


@contextlib.contextmanager
def bench_dir(bench: str) -> Iterator[Path]:
    """A scratch directory for one bench run: removed after success; after a failure its images
    are deleted and the logs kept (and their place printed)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"lab-bench-{bench}-"))
    ok = False
    try:
        yield workdir
        ok = True
    finally:
        for disk in workdir.glob("*.img"):
            disk.unlink()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            progress(f"bench {bench}: logs kept in {workdir}")


@contextlib.contextmanager
def boot_guest(bench: str, image: ImageInfo, workdir: Path, options: list[Option]) -> Iterator[Machine]:
    """The bench's guest, up and reachable over SSH; shut down on the way out."""
    machine = Machine(MachineConfig("bench", image, workdir / "vm", mem_mib=GUEST_MEM_MIB, options=options))
    try:
        machine.launch()
        progress(f"bench {bench}: guest up in {machine.wait_ready():.1f} s")
        yield machine
    finally:
        machine.shutdown()


def measure_all(
    ssh: GuestSSH,
    devices: dict[str, str],
    workloads: Workloads,
    seconds: float,
    repeat: int,
    check: Callable[[str], None] = lambda side: None,
) -> Samples:
    """Samples (iops, mb_s) by (workload, side); the sides alternate which runs first, and
    `check(side)` runs before each of its runs (e.g. that its back end is still alive)."""
    samples: Samples = {}
    total, done = repeat * len(workloads) * len(devices), 0
    width = max(map(len, devices))
    for rep in range(repeat):
        sides = list(devices) if rep % 2 == 0 else list(devices)[::-1]
        for name, job in workloads.items():
            for side in sides:
                check(side)
                sample = measure(ssh, devices[side], job, seconds)
                samples.setdefault((name, side), []).append(sample)
                done += 1
                progress(
                    f"[{done}/{total}] {side:{width}} {name}: {sample['iops']:8.0f} IOPS {sample['mb_s']:7.1f} MB/s"
                )
    return samples


def measure(ssh: GuestSSH, device: str, job: dict[str, object], seconds: float) -> dict[str, float]:
    options = {
        "filename": device, "direct": 1, "ioengine": "libaio", "time_based": 1, "runtime": f"{round(seconds * 1000)}ms",
        "ramp_time": "1s", "norandommap": 1, **job,
    }
    result = fio.run(ssh, {"bench": options}, timeout=seconds * 4 + 60).job("bench")
    iops = result.read_iops + result.write_iops
    return {"iops": iops, "mb_s": (result.read_bw_kib + result.write_bw_kib) * 1024 / 1e6}


def summarize(samples: Samples, args: argparse.Namespace, accel: str) -> dict:
    return {
        "bench": "guest-blk",
        "seconds_per_run": args.seconds,
        "repeat": args.repeat,
        "image_size": args.image_size,
        "queues": QUEUES,
        "accel": accel,
        "sides": list(BACKEND_KINDS),
        "rows": compare(samples, WORKLOADS, BACKEND_KINDS),
    }


def compare(samples: Samples, workloads: Workloads, sides: Iterable[str]) -> list[dict]:
    """A row per workload: median IOPS and MB/s of each side, ratio = first side / second (IOPS)."""
    ours, reference = sides
    rows = []
    for name, job in workloads.items():
        medians = {
            side: {
                "iops": round(statistics.median(s["iops"] for s in samples[(name, side)]), 1),
                "mb_s": round(statistics.median(s["mb_s"] for s in samples[(name, side)]), 2),
                "iops_runs": [round(s["iops"], 1) for s in samples[(name, side)]],
            }
            for side in (ours, reference)
        }
        base = medians[reference]["iops"]
        rows.append({"workload": name, **job, **medians, "ratio": round(medians[ours]["iops"] / base, 3) if base else 0.0})
    return rows


def table(result: dict, disks: str) -> list[str]:
    """Human-readable `result` of a bench comparing result["sides"] on `disks` (what they are)."""
    ours, reference = result["sides"]
    columns = [f"{ours} IOPS", f"{reference} IOPS", f"{ours} MB/s", f"{reference} MB/s"]
    head = f"{'workload':18} " + " ".join(f"{c:>{max(10, len(c))}}" for c in columns) + f" {'ratio':>6}"
    lines = [
        f"fio in a guest ({result['accel']}), {disks} of {result['image_size'] // MiB} MiB, "
        f"{result['seconds_per_run']} s per run, median of {result['repeat']}; ratio = {ours}/{reference} IOPS",
        head,
        "-" * len(head),
    ]
    for row in result["rows"]:
        values = [row[ours]["iops"], row[reference]["iops"], row[ours]["mb_s"], row[reference]["mb_s"]]
        cells = [f"{v:>{max(10, len(c))}.{0 if 'IOPS' in c else 1}f}" for v, c in zip(values, columns)]
        lines.append(f"{row['workload']:18} " + " ".join(cells) + f" {row['ratio']:6.2f}")
    return lines
