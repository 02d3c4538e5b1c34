"""`lab up`: boot a guest with the chosen storage and leave it running in the background."""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

from images import ImageInfo
from images.builder import ensure_image
from lab import labs
from lab.backends import QSD_SERIAL, REPO, SCSI_KIND, BackendProcess, ScsiLun, backend_available
from lab.errors import LabError
from lab.manifest import Manifest, qemu_version
from lab.qemu.accel import Accel
from lab.qemu.machine import (
    MachineConfig,
    Option,
    create_raw_image,
    vhost_user_blk_disk,
    vhost_user_scsi_disk,
    virtio_blk_disk,
)

BACKENDS = ("blk", "scsi", "qsd", "builtin")
_SIZE = re.compile(r"(\d+)([KMGT]?)(i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size_mib(text: str) -> int:
    """'256M', '1G', '1GiB' -> MiB (argparse type: one clear line for anything else)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 256M or 2G")
    size = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if size < 1 << 20 or size % (1 << 20):
        raise argparse.ArgumentTypeError(f"{text!r}: sizes are whole MiB, at least 1M")
    return size >> 20


def positive(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def lab_name(text: str) -> str:
    try:
        return labs.check_name(text)
    except LabError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "up",
        help="boot a guest with the chosen storage and keep it running in the background",
        description="Boot a guest whose data disk is served by the chosen back end and leave it (and the "
        "back end) running after this command returns. Prints how to reach it: `lab ssh`, `lab qmp`, "
        "`lab console`, the back end's log. `lab down NAME` stops it. State lives in $LAB_STATE "
        "(default $LAB_CACHE/labs), one directory per lab.",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="blk",
                        help="blk: our vhost-user-blk; scsi: our vhost-user-scsi (LUN 0:0); qsd: "
                             "qemu-storage-daemon's vhost-user-blk; builtin: QEMU's own virtio-blk (default blk)")
    parser.add_argument("--disk", type=size_mib, default=256, metavar="SIZE", help="data disk size (default 256M)")
    parser.add_argument("--queues", type=positive, default=2, metavar="N", help="request queues (default 2)")
    parser.add_argument("--mem", type=size_mib, default=1024, metavar="SIZE", help="guest RAM (default 1G)")
    parser.add_argument("--smp", type=positive, default=2, metavar="N", help="vCPUs (default 2)")
    parser.add_argument("--name", type=lab_name, help="lab name (default lab1, lab2, ...)")
    parser.add_argument("--seed", type=lambda t: int(t, 0), help="seed of the stamped workloads (default: random)")
    parser.add_argument("--postcopy-ready", action="store_true",
                        help="enable QEMU's postcopy-ram migration capability now, for migrations driven by hand "
                             "through `lab qmp` (`lab migrate` sets it for each migration itself; not with "
                             "--backend qsd, whose postcopy is broken on QEMU 7.2)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.postcopy_ready and args.backend == "qsd":
        raise LabError("--postcopy-ready: qemu-storage-daemon cannot do postcopy on QEMU 7.2; use --backend blk")
    kind = {"blk": "ours", "qsd": "qsd", "scsi": SCSI_KIND}.get(args.backend)
    if kind and (reason := backend_available(kind)):
        raise LabError(reason)
    name = args.name or labs.new_name()
    seed = args.seed if args.seed is not None else random.getrandbits(32)
    image = ensure_image(progress=lambda message: print(f"  image: {message}", flush=True))
    lab = labs.claim(labs.Lab(name=name, backend=args.backend, disk="", seed=seed, key=str(image.key)))
    disk = create_raw_image(lab.path("disk.img"), args.disk)
    lab.disk = str(disk)
    lab.guest_serial = guest_serial(lab)
    lab.details = {"disk_mib": args.disk, "queues": args.queues, "mem_mib": args.mem, "smp": args.smp,
                   "postcopy_ready": args.postcopy_ready}
    lab.save()
    backends, config = side(lab, lab.vm, image)
    print(f"lab {name}: booting a guest with a {args.disk} MiB {args.backend} disk (under TCG this takes a while) ...",
          flush=True)
    machine = labs.bring_up(lab, backends, config)
    try:
        if args.postcopy_ready:
            assert machine.qmp is not None
            machine.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
        manifest = Manifest(kind="lab", name=name, workdir=str(lab.dir), rootdir=str(REPO), image=image.to_json(),
                            accel=machine.accel.name if machine.accel else "", qemu_version=qemu_version(),
                            seeds={"seed": seed}, params={"lab_up": {k: v for k, v in vars(args).items() if k != "func"},
                                                          "guest_serial": lab.guest_serial})
        for backend in backends:
            manifest.add_backend(backend.kind, backend.argv(), backend.socket, backend.log)
        manifest.add_machine(name, machine.argv, lab.vm_dir, manifest.accel)
        manifest.write(lab.dir)
        lab.phase, lab.owner = "up", 0
        lab.save()
    except BaseException:
        machine.shutdown()
        lab.remove()
        raise
    print(f"guest answered SSH after {machine.boot_seconds:.1f} s ({manifest.accel})")
    machine.release()
    print(lab.reach())
    return 0


def side(lab: labs.Lab, name: str, image: ImageInfo, accel: Accel | None = None,
         incoming: str | None = None) -> tuple[list[BackendProcess], MachineConfig]:
    """One side of `lab` (`lab up` starts the first, `lab migrate` the next ones): its back end
    processes and its QEMU, both in the side's directory lab.path(name), on the lab's one data
    disk. Every side's guest is the same machine: only the paths (and `incoming`) differ."""
    workdir = lab.path(name)
    backends, options = storage(lab, workdir)
    config = MachineConfig(name=lab.name, image=image, workdir=workdir, mem_mib=lab.details["mem_mib"],
                           smp=lab.details["smp"], options=options, accel=accel, incoming=incoming)
    return backends, config


def guest_serial(lab: labs.Lab) -> str | None:
    """How the guest names the data disk (None: the scsi disk, which has no serial)."""
    return {"scsi": None, "qsd": QSD_SERIAL}.get(lab.backend, f"lab-{lab.name}"[:20])


def storage(lab: labs.Lab, workdir: Path) -> tuple[list[BackendProcess], list[Option]]:
    """The back end processes (socket, log and trace in `workdir`) and QEMU options of the
    lab's data disk."""
    socket, log, trace = str(workdir / "vu.sock"), workdir / "backend.log", str(workdir / "trace.jsonl")
    queues, serial = lab.details["queues"], guest_serial(lab)
    if lab.backend == "builtin":
        return [], virtio_blk_disk("data", lab.disk, serial)
    if lab.backend == "scsi":
        process = BackendProcess(kind=SCSI_KIND, socket=socket, log=log, luns=(ScsiLun(0, 0, lab.disk),),
                                 queues=queues, extra=("--trace", trace))
        return [process], vhost_user_scsi_disk("vu0", socket, queues)
    # a migration's destination opens the disk while the source still serves it
    if lab.backend == "qsd":
        process = BackendProcess(kind="qsd", socket=socket, log=log, image=lab.disk, queues=queues, shared_image=True)
        return [process], vhost_user_blk_disk("vu0", socket, queues)
    process = BackendProcess(kind="ours", socket=socket, log=log, image=lab.disk, queues=queues, serial=serial,
                             extra=("--trace", trace))
    return [process], vhost_user_blk_disk("vu0", socket, queues)
