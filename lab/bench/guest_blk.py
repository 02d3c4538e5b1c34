"""`lab bench guest-blk`: fio in a guest on two vhost-user-blk disks, ours against QSD.

One guest, two extra disks of the same size: one served by our back end, one by
qemu-storage-daemon, each image fully written and page-cache warm (so the numbers compare the
back ends, not the host disk). fio runs the same job on each disk in turn, and which disk goes
first alternates per repetition so machine noise falls on both alike; rows report medians.
Under TCG the guest itself is a big part of every number: compare the ratio, not the IOPS.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from images.builder import ensure_image
from lab.backends import BACKEND_KINDS, BackendProcess, backend_available
from lab.bench import emit, positive_int, progress
from lab.bench.backend import create_warm_image, image_size, positive_float
from lab.errors import LabError
from lab.guest import fio
from lab.guest.ssh import GuestSSH
from lab.qemu.machine import Machine, MachineConfig, vhost_user_blk_disk

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
    workdir = Path(tempfile.mkdtemp(prefix="lab-bench-gblk-"))
    backends: dict[str, BackendProcess] = {}
    machine: Machine | None = None
    ok = False
    try:
        for kind in BACKEND_KINDS:
            disk = workdir / f"{kind}.img"
            progress(f"bench guest-blk: writing a {args.image_size // MiB} MiB image for {kind}")
            create_warm_image(disk, args.image_size)
            backends[kind] = BackendProcess(
                kind=kind, socket=str(workdir / f"{kind}.sock"), image=str(disk), log=workdir / f"{kind}.log",
                queues=QUEUES, serial=OURS_SERIAL if kind == "ours" else None,
            ).start()
        options = [opt for kind, b in backends.items() for opt in vhost_user_blk_disk(f"vu-{kind}", b.socket, QUEUES)]
        machine = Machine(MachineConfig("bench", image, workdir / "vm", mem_mib=GUEST_MEM_MIB, options=options))
        machine.launch()
        progress(f"bench guest-blk: guest up in {machine.wait_ready():.1f} s")
        devices = {kind: machine.ssh.disk_by_serial(b.guest_serial) for kind, b in backends.items()}
        samples = measure_all(machine.ssh, devices, backends, args.seconds, args.repeat)
        accel = machine.accel.name if machine.accel else "?"
        machine.shutdown()
        for backend in backends.values():
            backend.check_alive()
            backend.close()
        ok = True
    finally:
        if machine is not None:
            machine.shutdown()
        for backend in backends.values():
            backend.stop()
        for disk in workdir.glob("*.img"):
            disk.unlink()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            progress(f"bench guest-blk: logs kept in {workdir}")
    result = summarize(samples, args, accel)
    emit(result, args.json, table(result))
    return 0


def measure_all(
    ssh: GuestSSH, devices: dict[str, str], backends: dict[str, BackendProcess], seconds: float, repeat: int
) -> dict[tuple[str, str], list[dict[str, float]]]:
    """Samples (iops, mb_s) by (workload, kind); the kinds alternate which runs first."""
    samples: dict[tuple[str, str], list[dict[str, float]]] = {}
    total, done = repeat * len(WORKLOADS) * len(devices), 0
    for rep in range(repeat):
        kinds = list(devices) if rep % 2 == 0 else list(devices)[::-1]
        for name, job in WORKLOADS.items():
            for kind in kinds:
                backends[kind].check_alive()
                sample = measure(ssh, devices[kind], job, seconds)
                samples.setdefault((name, kind), []).append(sample)
                done += 1
                progress(f"[{done}/{total}] {kind:4} {name}: {sample['iops']:8.0f} IOPS {sample['mb_s']:7.1f} MB/s")
    return samples


def measure(ssh: GuestSSH, device: str, job: dict[str, object], seconds: float) -> dict[str, float]:
    options = {
        "filename": device, "direct": 1, "ioengine": "libaio", "time_based": 1, "runtime": f"{round(seconds * 1000)}ms",
        "ramp_time": "1s", "norandommap": 1, **job,
    }
    result = fio.run(ssh, {"bench": options}, timeout=seconds * 4 + 60).job("bench")
    iops = result.read_iops + result.write_iops
    return {"iops": iops, "mb_s": (result.read_bw_kib + result.write_bw_kib) * 1024 / 1e6}


def summarize(samples: dict[tuple[str, str], list[dict[str, float]]], args: argparse.Namespace, accel: str) -> dict:
    rows = []
    for name, job in WORKLOADS.items():
        sides = {
            kind: {
                "iops": round(statistics.median(s["iops"] for s in samples[(name, kind)]), 1),
                "mb_s": round(statistics.median(s["mb_s"] for s in samples[(name, kind)]), 2),
                "iops_runs": [round(s["iops"], 1) for s in samples[(name, kind)]],
            }
            for kind in BACKEND_KINDS
        }
        qsd = sides["qsd"]["iops"]
        rows.append({"workload": name, **job, **sides, "ratio": round(sides["ours"]["iops"] / qsd, 3) if qsd else 0.0})
    return {
        "bench": "guest-blk",
        "seconds_per_run": args.seconds,
        "repeat": args.repeat,
        "image_size": args.image_size,
        "queues": QUEUES,
        "accel": accel,
        "rows": rows,
    }


def table(result: dict) -> list[str]:
    head = f"{'workload':18} {'ours IOPS':>10} {'qsd IOPS':>10} {'ours MB/s':>9} {'qsd MB/s':>9} {'ratio':>6}"
    lines = [
        f"fio in a guest ({result['accel']}), {result['queues']}-queue vhost-user-blk disks of "
        f"{result['image_size'] // MiB} MiB, {result['seconds_per_run']} s per run, median of {result['repeat']}; "
        "ratio = ours/qsd IOPS",
        head,
        "-" * len(head),
    ]
    for row in result["rows"]:
        ours, qsd = row["ours"], row["qsd"]
        lines.append(
            f"{row['workload']:18} {ours['iops']:10.0f} {qsd['iops']:10.0f} {ours['mb_s']:9.1f} {qsd['mb_s']:9.1f} "
            f"{row['ratio']:6.2f}"
        )
    return lines
