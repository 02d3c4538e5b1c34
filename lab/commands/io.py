"""`lab io NAME --workload stamps ...` / `lab io NAME --verify`: verifiable I/O in a lab's guest.

The guest writes stamped blocks (lab.guest.stamps: lba, generation and the lab's seed in every
4 KiB block) to its data disk with O_DIRECT and fsync, in the foreground or in the background
(to keep I/O running during a migration). Every workload is recorded in the lab's io.json and
manifest; --verify waits for background writers, then checks the host's image file bit for bit
against all of them: the right generation in every written block, zeros everywhere else.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lab import labs
from lab.commands.up import positive
from lab.errors import LabError, TimeoutExpired
from lab.guest import stamps
from lab.guest.ssh import GuestSSH
from lab.guest.stamps import StampWrite
from lab.manifest import load as load_manifest
from lab.virtio.workload import verify_image

WORKLOADS = ("stamps",)
IO_FILE = "io.json"
SSH_SECONDS = 30.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "io",
        help="run a stamped, verifiable workload in a lab's guest, or verify what ran",
        description="--workload stamps: the guest writes BLOCKS stamped 4 KiB blocks from --first-lba (every "
        "STRIDE-th block), PASSES times with a new generation each pass, O_DIRECT + fsync; --background returns "
        "at once and leaves the writer running (e.g. across `lab migrate`). --verify: wait for background "
        "writers, then check the host's image of the data disk bit for bit against every recorded workload.",
    )
    parser.add_argument("name", help="the lab")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--workload", choices=WORKLOADS, help="start this workload")
    action.add_argument("--verify", action="store_true", help="check the disk against every recorded workload")
    parser.add_argument("--blocks", type=positive, default=4096, help="blocks per pass (default 4096 = 16 MiB)")
    parser.add_argument("--first-lba", type=lambda t: int(t, 0), default=0, help="first 4 KiB block (default 0)")
    parser.add_argument("--stride", type=positive, default=1, help="write every STRIDE-th block (default 1)")
    parser.add_argument("--passes", type=positive, default=1, help="passes, each a new generation (default 1)")
    parser.add_argument("--background", action="store_true", help="return at once; --verify waits for it")
    parser.add_argument("--timeout", type=positive, default=900, help="seconds to wait for the writers (default 900)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    lab = labs.Lab.load(args.name).require_running()
    with GuestSSH.connect(lab.ssh_port, Path(lab.key), SSH_SECONDS) as ssh:
        if args.verify:
            return verify(lab, ssh, args.timeout)
        return start(lab, ssh, args)


def recorded(lab: labs.Lab) -> list[dict]:
    try:
        return json.loads(lab.path(IO_FILE).read_text())
    except FileNotFoundError:
        return []


def _record(lab: labs.Lab, workloads: list[dict]) -> None:
    lab.path(IO_FILE).write_text(json.dumps(workloads, indent=2) + "\n")
    manifest_path = lab.path("manifest.json")
    if manifest_path.exists():  # the manifest replays the workloads too (`lab repro`)
        manifest = load_manifest(manifest_path)
        manifest.workloads = workloads
        manifest.write(lab.dir)


def writes(workload: dict) -> list[StampWrite]:
    return [StampWrite(workload["first_lba"], workload["count"], g, workload["stride"]) for g in workload["generations"]]


def guest_disk(lab: labs.Lab, ssh: GuestSSH) -> str:
    if lab.guest_serial:
        return ssh.disk_by_serial(lab.guest_serial)
    if lab.backend == "scsi":
        found = ssh.run("ls -d /sys/block/sd* 2>/dev/null; true").stdout.split()
        if len(found) != 1:
            raise LabError(f"lab {lab.name}: expected one SCSI disk in the guest, found {found}")
        return "/dev/" + Path(found[0]).name
    raise LabError(f"lab {lab.name} does not know its data disk (a scenario's setup); use `lab ssh {lab.name}`")


def start(lab: labs.Lab, ssh: GuestSSH, args: argparse.Namespace) -> int:
    blocks = Path(lab.disk).stat().st_size // stamps.BLOCK
    last = args.first_lba + (args.blocks - 1) * args.stride
    if args.first_lba < 0 or last >= blocks:
        raise LabError(f"blocks {args.first_lba}..{last} do not fit the {blocks}-block disk")
    workloads = recorded(lab)
    if any(w["background"] and not w.get("done") for w in workloads):
        raise LabError(f"a background workload is still recorded as running: `lab io {lab.name} --verify` first")
    device = guest_disk(lab, ssh)
    stamps.install(ssh)
    generation = max((g for w in workloads for g in w["generations"]), default=0) + 1
    workload = {"id": len(workloads) + 1, "kind": args.workload, "device": device, "first_lba": args.first_lba,
                "count": args.blocks, "stride": args.stride, "seed": lab.seed, "background": args.background,
                "generations": list(range(generation, generation + args.passes)), "started": time.time()}
    commands = " && ".join(stamps.write_command(device, w, lab.seed) for w in writes(workload))
    began = time.monotonic()
    if args.background:
        rc, log = _guest_files(workload)
        script = f"rm -f {rc}; ({commands}) >{log} 2>&1; echo $? >{rc}"
        ssh.start_detached(script)
    else:
        ssh.run(commands, timeout=args.timeout)
        workload["done"] = True
    workloads.append(workload)
    _record(lab, workloads)
    what = (f"workload {workload['id']}: {args.blocks} stamped blocks from lba {args.first_lba} (stride "
            f"{args.stride}), generations {workload['generations'][0]}..{workload['generations'][-1]}, seed "
            f"{lab.seed:#x}, on {device}")
    if args.background:
        print(f"{what}: running in the background; `lab io {lab.name} --verify` waits for it and checks")
    else:
        print(f"{what}: written and synced in {time.monotonic() - began:.1f} s; `lab io {lab.name} --verify` checks")
    return 0


def _guest_files(workload: dict) -> tuple[str, str]:
    return f"/root/lab-io-{workload['id']}.rc", f"/root/lab-io-{workload['id']}.log"


def verify(lab: labs.Lab, ssh: GuestSSH, timeout: float) -> int:
    workloads = recorded(lab)
    if not workloads:
        raise LabError(f"lab {lab.name} has no recorded workload: `lab io {lab.name} --workload stamps` first")
    deadline = time.monotonic() + timeout
    for workload in workloads:
        if workload["background"] and not workload.get("done"):
            _wait_background(ssh, workload, deadline)
            workload["done"] = True
    _record(lab, workloads)
    expected = stamps.expected(w for workload in workloads for w in writes(workload))
    began = time.monotonic()
    mismatches = verify_image(lab.disk, expected, lab.seed)
    if mismatches:
        print(f"{len(mismatches)} blocks wrong in {lab.disk}:")
        for mismatch in mismatches[:10]:
            print(f"  {mismatch}")
        return 1
    total = Path(lab.disk).stat().st_size // stamps.BLOCK
    print(f"verified: {len(expected)} stamped blocks of {len(workloads)} workloads bit-exact and the other "
          f"{total - len(expected)} blocks zero in {lab.disk} ({time.monotonic() - began:.1f} s)")
    return 0


def _wait_background(ssh: GuestSSH, workload: dict, deadline: float) -> None:
    rc, log = _guest_files(workload)
    while True:
        status = ssh.run(f"cat {rc} 2>/dev/null; true").stdout.strip()
        if status:
            break
        if time.monotonic() > deadline:
            raise TimeoutExpired(f"background workload {workload['id']} still running; see {log} in the guest")
        time.sleep(1.0)
    if status != "0":
        detail = ssh.run(f"tail -n 5 {log}; true").stdout.strip()
        raise LabError(f"background workload {workload['id']} failed in the guest (exit {status}): {detail}")
