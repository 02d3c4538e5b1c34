"""`lab bench guest-driver`: 4 KiB random reads through our userspace driver and through the guest
kernel's virtio-blk driver (fio), on the same device in the same guest.

One vhost-user-blk-pci disk served by our back end (image fully written and page-cache warm) at
a known PCI address. For each queue depth, fio runs on the kernel's /dev/vdX, then labvirtio.pyz
takes the device from the kernel, runs the same workload, and gives it back. Under TCG the
guest CPU dominates both: the ratio (userspace / kernel IOPS) is the number to watch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses

from images.builder import ensure_image
from lab.backends import BackendProcess, backend_available
from lab.bench import emit, progress
from lab.bench.backend import create_warm_image, image_size, positive_float
from lab.bench.guest_blk import MiB, bench_dir, boot_guest, measure
from lab.errors import LabError
from lab.guest.driver import GuestDriver, build_zipapp
from lab.qemu.machine import at_pci_slot, pci_address, vhost_user_blk_disk

SLOT = 0x10
SERIAL = "bench-driver"
DEPTHS = (1, 32)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "guest-driver", help="4 KiB random reads: our userspace virtio driver vs the guest kernel's, same disk"
    )
    parser.add_argument("--seconds", type=positive_float, default=5.0, help="length of each run (5)")
    parser.add_argument("--image-size", type=image_size, default=256 * MiB, metavar="SIZE",
                        help="size of the raw image, e.g. 256M, 1G (256M)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    reason = backend_available("ours")
    if reason:
        raise LabError(f"bench guest-driver needs our back end: {reason}")
    image = ensure_image(progress=progress)
    with bench_dir("guest-driver") as workdir, contextlib.ExitStack() as stack:
        disk = workdir / "ours.img"
        progress(f"bench guest-driver: writing a {args.image_size // MiB} MiB image")
        create_warm_image(disk, args.image_size)
        backend = BackendProcess(kind="ours", socket=str(workdir / "ours.sock"), image=str(disk),
                                 log=workdir / "ours.log", queues=1, serial=SERIAL)
        stack.callback(backend.stop)
        backend.start()
        options = at_pci_slot(vhost_user_blk_disk("vu", backend.socket, 1), SLOT)
        machine = stack.enter_context(boot_guest("guest-driver", image, workdir, options))
        driver = GuestDriver.install(machine.ssh, build_zipapp(workdir))
        rows = []
        for qd in DEPTHS:
            name = f"randread-4k-qd{qd}"
            device = machine.ssh.disk_by_serial(SERIAL)  # the kernel's name may change after a rebind
            kernel = measure(machine.ssh, device, {"rw": "randread", "bs": "4k", "iodepth": qd}, args.seconds)
            progress(f"{name} kernel:    {kernel['iops']:8.0f} IOPS")
            backend.check_alive()
            ours = driver.io(pci_address(SLOT), rw="randread", bs=4096, qd=qd, seconds=args.seconds, seed=qd)
            if ours.errors:
                raise LabError(f"userspace driver: {ours.errors} failed requests in {name}")
            progress(f"{name} userspace: {ours.iops:8.0f} IOPS")
            rows.append({
                "workload": name, "qd": qd, "kernel_iops": round(kernel["iops"], 1), "userspace_iops": ours.iops,
                "ratio": round(ours.iops / kernel["iops"], 3) if kernel["iops"] else 0.0,
                "userspace_latency_us": dataclasses.asdict(ours.latency), "userspace_kicks": ours.kicks,
            })
        accel = machine.accel.name if machine.accel else "?"
        machine.shutdown()
        backend.check_alive()
        backend.close()
    result = {"bench": "guest-driver", "seconds_per_run": args.seconds, "image_size": args.image_size,
              "device": "vhost-user-blk-pci (our back end), 1 queue", "accel": accel, "rows": rows}
    lines = [f"4 KiB random read in a guest ({accel}), {args.seconds} s per run; ratio = userspace/kernel IOPS",
             f"{'workload':18} {'kernel IOPS':>12} {'userspace IOPS':>15} {'ratio':>6}"]
    lines += [f"{r['workload']:18} {r['kernel_iops']:12.0f} {r['userspace_iops']:15.0f} {r['ratio']:6.2f}" for r in rows]
    emit(result, args.json, lines)
    return 0
