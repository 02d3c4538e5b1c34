"""`lab repro MANIFEST [--keep]`: run a recorded setup again, with the same seeds.

A lab's manifest (`lab up`): the recorded back end and QEMU command lines are started again in a
fresh lab directory on fresh disks, the recorded workloads are replayed with the same seed and
verified. A scenario's manifest (kept with a failed test's artifacts): the test runs again
(pytest, same node id, same seeds) and the outcome is compared with the recorded one. --keep
leaves the recorded setup running as a lab (`lab ssh`, `lab qmp`, ...) for inspection.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab import labs
from lab.backends import BackendProcess
from lab.commands import io
from lab.commands.up import lab_name
from lab.errors import LabError
from lab.guest import stamps
from lab.manifest import MANIFEST, Manifest, load, relocate, relocated_argv, signature
from lab.qemu import accel as accel_mod
from lab.qemu.machine import Machine, MachineConfig

PYTEST_SECONDS = 3600.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "repro",
        help="re-run a recorded lab or scenario from its manifest.json",
        description="MANIFEST is a manifest.json (or its directory) written by `lab up` or kept with a failed "
        "scenario's artifacts. A lab's: the exact recorded back end and QEMU command lines run again on fresh "
        "disks, its `lab io` workloads are replayed with the same seed and verified. A scenario's: the test runs "
        "again with pytest and the outcome is compared with the recorded one (exit 0: reproduced). --keep "
        "leaves the recorded setup up as a lab and prints how to reach it.",
    )
    parser.add_argument("manifest", type=Path, help="manifest.json, or the directory holding it")
    parser.add_argument("--keep", action="store_true", help="leave the guest up as a lab for inspection")
    parser.add_argument("--name", type=lab_name, help="name of the kept lab (default repro1, repro2, ...)")
    parser.set_defaults(func=run)


@dataclasses.dataclass(kw_only=True)
class RecordedBackend(BackendProcess):
    """A back end started from its recorded command line, verbatim."""

    recorded: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        return list(self.recorded)


def run(args: argparse.Namespace) -> int:
    manifest = load(args.manifest)
    if manifest.kind == "scenario":
        status = rerun_scenario(manifest)
        if args.keep:
            lab, machine = boot_recorded(manifest, args.name)
            keep(lab, machine)
        return status
    lab, machine = boot_recorded(manifest, args.name)
    try:
        status = replay_workloads(lab, machine, manifest)
    except BaseException:
        machine.shutdown()
        lab.remove()
        raise
    if args.keep:
        keep(lab, machine)
    else:
        machine.shutdown()
        lab.remove()
        print(f"repro of lab {manifest.name}: guest and back end stopped")
    return status


def keep(lab: labs.Lab, machine: Machine) -> None:
    machine.release()
    print(lab.reach())


def boot_recorded(manifest: Manifest, name: str | None) -> tuple[labs.Lab, Machine]:
    """The recorded back ends and first guest, started from their command lines in a new lab."""
    if not manifest.machines:
        raise LabError(f"manifest of {manifest.name} records no guest")
    image = manifest.image_info()
    recorded = manifest.machines[0]
    old = manifest.workdir
    upped = manifest.params.get("lab_up", {})
    lab = labs.claim(labs.Lab(name=name or labs.new_name("repro"), backend=upped.get("backend", "scenario"),
                              disk="", seed=manifest.seeds.get("seed", 0), key=str(image.key),
                              guest_serial=manifest.params.get("guest_serial"),
                              vm=str(Path(recorded["workdir"]).relative_to(old))))
    new = lab.dir
    for disk in manifest.disks:
        path = Path(relocate(disk["path"], old, str(new)))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(disk["size"])
    lab.disk = relocate(manifest.disks[0]["path"], old, str(new)) if manifest.disks else ""
    lab.details = {"repro_of": manifest.name, "manifest": str(manifest.workdir)}
    lab.save()
    backends = [
        RecordedBackend(kind=b["kind"], socket=relocate(b["socket"], old, str(new)),
                        log=Path(relocate(b["log"], old, str(new))), recorded=tuple(relocated_argv(b["argv"], old, new)))
        for b in manifest.backends
    ]
    config = MachineConfig(name=recorded["name"], image=image, workdir=lab.vm_dir,
                           recorded_argv=tuple(relocated_argv(recorded["argv"], old, new)),
                           accel=accel_mod.by_name(manifest.accel) if manifest.accel else None)
    print(f"repro of {manifest.kind} {manifest.name}: {len(backends)} back end(s) and guest {recorded['name']} from "
          f"the recorded command lines, in {new}", flush=True)
    machine = labs.bring_up(lab, backends, config)
    lab.phase, lab.owner = "up", 0
    lab.save()
    print(f"guest answered SSH after {machine.boot_seconds:.1f} s", flush=True)
    return lab, machine


def replay_workloads(lab: labs.Lab, machine: Machine, manifest: Manifest) -> int:
    if not manifest.workloads:
        print("no workloads recorded: the setup came up, nothing to replay")
        return 0
    device = io.guest_disk(lab, machine.ssh)
    stamps.install(machine.ssh)
    for workload in manifest.workloads:
        for write in io.writes(workload):
            stamps.write(machine.ssh, device, write, lab.seed, timeout=900)
    replayed = [{**w, "device": device, "background": False, "done": True} for w in manifest.workloads]
    lab.path(io.IO_FILE).write_text(json.dumps(replayed, indent=2) + "\n")
    print(f"replayed {len(replayed)} workloads with seed {lab.seed:#x}")
    return io.verify(lab, machine.ssh, timeout=60)


def rerun_scenario(manifest: Manifest) -> int:
    """Run the recorded test again; 0 when it ends as recorded (the same failure)."""
    artifacts = Path(tempfile.mkdtemp(prefix="lab-repro-artifacts-"))
    env = {**os.environ, "LAB_ARTIFACTS": str(artifacts)}  # the recorded artifacts stay as they are
    argv = [sys.executable, "-m", "pytest", manifest.name, "-p", "no:cacheprovider"]
    print(f"re-running {manifest.name} in {manifest.rootdir} (seeds {manifest.seeds})", flush=True)
    began = time.monotonic()
    try:
        subprocess.run(argv, cwd=manifest.rootdir, env=env, timeout=PYTEST_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise LabError(f"the re-run of {manifest.name} took over {PYTEST_SECONDS:.0f} s") from None
    found = sorted(artifacts.glob(f"*/{MANIFEST}"))
    outcome = load(found[0]).outcome if found else None
    if not found:  # nothing failed, nothing to look at
        shutil.rmtree(artifacts, ignore_errors=True)
    recorded = manifest.outcome or {"outcome": "passed"}
    now = outcome or {"outcome": "passed"}
    same = recorded["outcome"] == now["outcome"] and signature(recorded.get("message", "")) == signature(
        now.get("message", ""))
    print(f"recorded: {recorded['outcome']} {recorded.get('when', '')}: {signature(recorded.get('message', ''))}")
    print(f"re-run:   {now['outcome']} {now.get('when', '')}: {signature(now.get('message', ''))} "
          f"({time.monotonic() - began:.0f} s; re-run artifacts: {artifacts if found else 'none'})")
    print("reproduced: it fails the same way" if same else "NOT reproduced: the outcome differs")
    return 0 if same else 1
