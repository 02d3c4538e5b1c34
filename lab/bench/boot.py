"""`lab bench boot`: seconds from QEMU start to a guest answering SSH, over several boots."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from images.builder import ensure_image
from lab.bench import emit, positive_int, progress, spread
from lab.qemu.machine import Machine, MachineConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("boot", help="boot-to-SSH time of the guest image")
    parser.add_argument("--runs", type=positive_int, default=3, help="number of boots (3)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    image = ensure_image(progress=progress)
    workroot = Path(tempfile.mkdtemp(prefix="lab-bench-boot-"))
    seconds: list[float] = []
    accel = qemu_version = ""
    try:
        for i in range(args.runs):
            with Machine(MachineConfig(f"boot{i}", image, workroot / f"b{i}")) as machine:
                machine.wait_ready()
                machine.ssh.run("true")
                seconds.append(machine.boot_seconds or 0.0)
                accel = machine.accel.name if machine.accel else "?"
                version = machine.qmp.cmd("query-version") if machine.qmp else {}
                q = version.get("qemu", {})
                qemu_version = (
                    f"{q.get('major')}.{q.get('minor')}.{q.get('micro')} "
                    f"({version.get('package', '').strip()})"
                )
            progress(f"boot {i + 1}/{args.runs}: {seconds[-1]:.2f} s")
    except BaseException:
        if any(workroot.iterdir()):
            progress(f"bench boot: logs kept in {workroot}")
        else:
            workroot.rmdir()
        raise
    shutil.rmtree(workroot, ignore_errors=True)
    result = {
        "bench": "boot",
        "runs": args.runs,
        "boot_to_ssh_seconds": [round(s, 3) for s in seconds],
        **{f"{k}_seconds": v for k, v in spread(seconds).items()},
        "accel": accel,
        "qemu_version": qemu_version,
        "image_recipe_hash": image.recipe_hash,
        "kernel_version": image.kernel_version,
    }
    stats = spread(seconds)
    emit(
        result,
        args.json,
        [
            f"boot-to-SSH over {args.runs} boots: min {stats['min']:.2f} s, "
            f"median {stats['median']:.2f} s, max {stats['max']:.2f} s",
            f"accelerator {accel}; QEMU {qemu_version}",
            f"image {image.recipe_hash[:16]} (kernel {image.kernel_version})",
        ],
    )
    return 0
