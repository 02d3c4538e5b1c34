"""`lab bench guest-scsi`: fio in a guest on two SCSI disks, our vhost-user-scsi against QEMU's.

One guest, two controllers, one disk each, same size: LUN 0:0 of a vhost-user-scsi-pci served
by our back end, and a scsi-hd on QEMU's built-in virtio-scsi-pci. Images, alternation and
medians as in `lab bench guest-blk` (whose helpers this reuses); compare the ratio, not the IOPS.
"""

from __future__ import annotations

import argparse
import contextlib

from images.builder import ensure_image
from lab.backends import SCSI_KIND, BackendProcess, ScsiLun, backend_available
from lab.bench import emit, positive_int, progress
from lab.bench.backend import create_warm_image, image_size, positive_float
from lab.bench.guest_blk import MiB, WORKLOADS, bench_dir, boot_guest, compare, measure_all, table
from lab.errors import LabError
from lab.guest.ssh import GuestSSH
from lab.qemu.machine import ScsiHd, vhost_user_scsi_disk, virtio_scsi_disks

QUEUES = 2
SIDES = {"ours": "LAB", "builtin": "QEMU"}  # side -> INQUIRY vendor of its disk
SCSI_WORKLOADS = {name: WORKLOADS[name] for name in ("randread-4k-qd32", "seqread-1m-qd4")}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "guest-scsi", help="fio in a guest: our vhost-user-scsi back end vs QEMU's virtio-scsi + scsi-hd"
    )
    parser.add_argument("--seconds", type=positive_float, default=5.0, help="length of each fio run (5)")
    parser.add_argument("--repeat", type=positive_int, default=2, help="runs per workload and side; median (2)")
    parser.add_argument("--image-size", type=image_size, default=256 * MiB, metavar="SIZE",
                        help="size of each raw image, e.g. 256M, 1G (256M)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = measure(args.seconds, args.repeat, args.image_size)
    emit(result, args.json, table(result, f"{QUEUES}-queue virtio-scsi disks"))
    return 0


def measure(seconds: float, repeat: int, size: int) -> dict:
    """Both controllers in one guest; the result document (also the scsi rows of `lab bench backend`)."""
    reason = backend_available(SCSI_KIND)
    if reason:
        raise LabError(f"bench guest-scsi needs our scsi back end: {reason}")
    image = ensure_image(progress=progress)
    with bench_dir("guest-scsi") as workdir, contextlib.ExitStack() as stack:
        disks = {side: workdir / f"{side}.img" for side in SIDES}
        for side, disk in disks.items():
            progress(f"bench guest-scsi: writing a {size // MiB} MiB image for {side}")
            create_warm_image(disk, size)
        backend = BackendProcess(
            kind=SCSI_KIND, socket=str(workdir / "scsi.sock"), log=workdir / "scsi.log",
            luns=(ScsiLun(0, 0, str(disks["ours"])),), queues=QUEUES,
        )
        stack.callback(backend.stop)
        backend.start()
        options = [
            *vhost_user_scsi_disk("vus", backend.socket, QUEUES),
            *virtio_scsi_disks("qscsi", [ScsiHd(0, 0, disks["builtin"])], QUEUES),
        ]
        machine = stack.enter_context(boot_guest("guest-scsi", image, workdir, options))
        devices = {side: disk_by_vendor(machine.ssh, vendor) for side, vendor in SIDES.items()}
        samples = measure_all(
            machine.ssh, devices, SCSI_WORKLOADS, seconds, repeat,
            check=lambda side: backend.check_alive() if side == "ours" else None,
        )
        accel = machine.accel.name if machine.accel else "?"
        machine.shutdown()
        backend.check_alive()
        backend.close()
    return {
        "bench": "guest-scsi",
        "seconds_per_run": seconds,
        "repeat": repeat,
        "image_size": size,
        "queues": QUEUES,
        "accel": accel,
        "sides": list(SIDES),
        "rows": compare(samples, SCSI_WORKLOADS, SIDES),
    }


def disk_by_vendor(ssh: GuestSSH, vendor: str) -> str:
    """/dev path of the guest's only SCSI disk whose INQUIRY vendor is `vendor`."""
    listing = ssh.run(
        'for d in /sys/bus/scsi/devices/*:*:*:*; do echo "$(cat $d/vendor) $(ls $d/block)"; done'
    ).stdout
    found = [f"/dev/{block}" for v, block in (line.split() for line in listing.splitlines()) if v == vendor]
    if len(found) != 1:
        raise LabError(f"guest has {len(found)} SCSI disks from vendor {vendor!r}:\n{listing}")
    return found[0]
