"""`lab migrate NAME [--postcopy] [--after-passes K] [--bandwidth B] [--postcopy-bandwidth B]`:
live-migrate a lab's guest to a fresh side, a new QEMU (started with -incoming defer) and a new
back end process of the same kind on the same disk image, both detached and recorded in the
lab's state like `lab up`'s.

Progress is printed from the source's query-migrate answers (lab.qemu.migration polls them; the
source's monitor here shows each one and every command migrate() sends). When the migration
completed, the guest answers SSH on the new side and nothing went wrong, the old side is
stopped and forgotten and every command (ssh, qmp, console, io, down, ls) reaches the new one.
When it failed or was cancelled, the destination is stopped and forgotten and the guest runs on
at its source. The result record and the timeline (I/O each back end served, with the phases;
PNG + JSON in the lab's directory) are printed either way.

Ctrl-C (also SIGTERM, SIGHUP) cancels between two polls, never in the middle of a QMP
exchange; a second one stops the destination at once (in precopy the source then fails the
migration and runs on). Postcopy cannot be cancelled once the destination runs the guest.

QEMU's built-in virtio-blk (--backend builtin) migrates too: the image is shared, and QEMU
hands its block node over at the switch (the destination opens it inactive, so the image
locks do not collide).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from images import ImageInfo
from lab import labs
from lab.backends import BackendProcess
from lab.commands.up import positive, side
from lab.errors import LabError
from lab.manifest import MANIFEST
from lab.manifest import load as load_manifest
from lab.migration_job import POSTCOPY, PRECOPY
from lab.qemu import accel as accel_mod
from lab.qemu import timeline
from lab.qemu.machine import Machine, MachineConfig
from lab.qemu.migration import (
    TERMINAL,
    UNLIMITED,
    MigrationPlan,
    MigrationResult,
    check_backends,
    check_source_running,
    migrate,
    monitor,
)
from lab.qemu.qmp import QMP

PROGRESS_SECONDS = 2.0  # a progress line at least this often, and at every status or pass
RESUME_SECONDS = 10.0  # the source runs again after a failed or cancelled migration
MiB = 1 << 20
_RATE = re.compile(r"(\d+(?:\.\d+)?)([KMG]?)(i?B)?(/s)?", re.IGNORECASE)
_RATE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "migrate",
        help="live-migrate a lab's guest to a new QEMU and back end on the same disk",
        description="Move the running guest of lab NAME to a fresh side: a new back end process of the same "
        "kind on the same disk image and a new QEMU started with -incoming defer, then a live migration over a "
        "unix socket. Precopy (default): the first passes run under the bandwidth limit, then the limit is "
        "lifted so the migration converges. --postcopy: after the passes the destination takes over the guest "
        "and pulls the missing pages (needs userfaultfd; not with qemu-storage-daemon). Progress is printed "
        "while it runs; then the result record and the timeline picture (PNG + JSON in the lab's directory). "
        "On success the old QEMU and back end are stopped and `lab ssh/qmp/console/io/down` reach the new side; "
        "on failure or Ctrl-C the destination is stopped and the guest runs on where it was. Workloads started "
        "with `lab io --background` keep running across it; `lab io NAME --verify` checks them afterwards.",
    )
    parser.add_argument("name", help="the lab")
    parser.add_argument("--postcopy", action="store_true",
                        help="switch to postcopy after the passes (default: precopy, the limit lifted after them)")
    parser.add_argument("--after-passes", type=positive, metavar="K",
                        help=f"dirty-sync passes before the switch (default {PRECOPY.passes}; with --postcopy "
                             f"{POSTCOPY.passes}: at once)")
    parser.add_argument("--bandwidth", type=bandwidth, metavar="B",
                        help=f"bytes/s during the passes before the switch, e.g. 32M, 1G or unlimited (default "
                             f"{PRECOPY.limit_bandwidth >> 20}M); low limits make every pass long")
    parser.add_argument("--postcopy-bandwidth", type=bandwidth, metavar="B",
                        help="with --postcopy: bytes/s of the background page stream once in postcopy (default "
                             "unlimited); a low one leaves pages missing longer, so the device meets more of them "
                             f"(the scenarios use {POSTCOPY.postcopy_bandwidth >> 20}M)")
    parser.set_defaults(func=run)


def bandwidth(text: str) -> int:
    """'32M', '1.5G', '64MiB/s', 'unlimited' -> bytes/s (argparse type)."""
    if text.strip().lower() == "unlimited":
        return UNLIMITED
    match = _RATE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a bandwidth like 32M, 1G or unlimited")
    rate = int(float(match.group(1)) * _RATE_UNITS[match.group(2).upper()])
    if rate < 1 << 20:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 1M (bytes/s), or a pass takes forever")
    return rate


def plan_from(args: argparse.Namespace) -> MigrationPlan:
    if args.postcopy_bandwidth is not None and not args.postcopy:
        raise LabError("--postcopy-bandwidth needs --postcopy")
    # a person's postcopy finishes as fast as it can unless asked otherwise; the scenarios' slow
    # stream is there to make the device meet missing pages
    plan = dataclasses.replace(POSTCOPY, postcopy_bandwidth=args.postcopy_bandwidth) if args.postcopy else PRECOPY
    if args.after_passes is not None:
        plan = dataclasses.replace(plan, passes=args.after_passes)
    if args.bandwidth is not None:
        plan = dataclasses.replace(plan, limit_bandwidth=args.bandwidth)
    return plan


def describe(plan: MigrationPlan) -> str:
    limit = plan.limit_bandwidth or UNLIMITED
    rate = "unlimited" if limit >= UNLIMITED else f"{limit / MiB:g} MiB/s"
    then = "switch to postcopy" if plan.postcopy else "lift the limit"
    return f"{'postcopy' if plan.postcopy else 'precopy'}: {rate} for {plan.passes} pass(es), then {then}"


def run(args: argparse.Namespace) -> int:
    lab = labs.Lab.load(args.name).require_running()
    plan = plan_from(args)
    check_ready(lab, plan)
    image, accel = recorded_guest(lab)
    target = lab.next_side()
    source_backends, source_config = side(lab, lab.vm, image, accel)
    backends, config = side(lab, target, image, accel, incoming="defer")
    lab.phase, lab.owner = "migrating", os.getpid()
    lab.save()
    try:
        return Hop(lab, plan, source_backends, source_config, target, backends, config).run()
    finally:
        if lab.path(labs.STATE_FILE).exists():  # else `lab down` removed it meanwhile
            lab.phase = "up" if lab.phase == "migrating" else lab.phase
            lab.owner = 0
            lab.save()


def check_ready(lab: labs.Lab, plan: MigrationPlan) -> None:
    if "mem_mib" not in lab.details:
        raise LabError(f"lab {lab.name} runs recorded command lines (lab repro); lab migrate moves labs "
                       f"started by lab up")
    if not plan.postcopy:
        return
    if lab.backend == "qsd":
        raise LabError("--postcopy: qemu-storage-daemon cannot do postcopy on QEMU 7.2 (it dies on the "
                       "destination); migrate a qsd lab without --postcopy")
    from lab.vhost_user import postcopy  # ctypes and userfaultfd: only for postcopy

    if reason := postcopy.probe():
        raise LabError(f"--postcopy needs userfaultfd, which does not work here: {reason}")


def recorded_guest(lab: labs.Lab) -> tuple[ImageInfo, accel_mod.Accel | None]:
    """The guest image and accelerator the lab booted with (its manifest): a destination must be
    the very same machine, even if the image was rebuilt since."""
    manifest = load_manifest(lab.path(MANIFEST))
    return manifest.image_info(), accel_mod.by_name(manifest.accel) if manifest.accel else None


class Interrupts:
    """Ctrl-C, SIGTERM or SIGHUP while the migration runs: the first asks for a cancel, which the
    source's monitor sends at its next poll; a second one raises KeyboardInterrupt at once
    (while `escalate`), otherwise it is only counted."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.count = 0
        self.escalate = True
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        self._saved = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.count > 1 and self.escalate:
            raise KeyboardInterrupt

    @property
    def requested(self) -> bool:
        return self.count > 0


class Progress:
    """Prints the migration's progress: one line per status or pass, and every PROGRESS_SECONDS."""

    def __init__(self) -> None:
        self.began: float | None = None  # monotonic time of the migrate command
        self.statuses: set[str] = set()
        self._last: tuple[str, int] | None = None
        self._printed = 0.0

    def started(self) -> None:
        self.began = self._printed = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - (self.began or time.monotonic())

    def seen(self, info: dict) -> None:
        status, ram = info.get("status", "none"), info.get("ram", {})
        self.statuses.add(status)
        passes = ram.get("dirty-sync-count", 0)
        if (status, passes) == self._last and time.monotonic() - self._printed < PROGRESS_SECONDS:
            return
        self._last, self._printed = (status, passes), time.monotonic()
        line = f"{status:<15} pass {passes:<3} {ram.get('transferred', 0) / MiB:7.1f} MiB sent"
        if status not in TERMINAL:
            line += f"  {ram.get('remaining', 0) / MiB:7.1f} MiB left  {ram.get('mbps', 0) / 8 * 1e6 / MiB:6.1f} MiB/s"
        if status.startswith("postcopy"):
            line += f"  {ram.get('postcopy-requests', 0)} pages requested"
        self.say(line)

    def say(self, what: str) -> None:
        print(f"  {self.elapsed():6.1f} s  {what}", flush=True)


class SourceMonitor(QMP):
    """The source's QMP, as lab.qemu.migration drives it: every query-migrate answer becomes a
    progress line, every command sent after `migrate` is shown, and a requested interrupt turns
    into migrate_cancel here, between two polls."""

    def __init__(self, lab: labs.Lab, progress: Progress, interrupts: Interrupts) -> None:
        super().__init__(lab.qmp_socket, lab.vm_dir / "qmp.jsonl")
        self.progress = progress
        self.interrupts = interrupts
        self.cancelled = False
        self._told = False

    def cmd(self, name: str, **args: Any) -> Any:
        if self.progress.began is not None and name not in ("query-migrate", "query-status"):
            self.progress.say(f"-> {name} {args or ''}".rstrip())
        result = super().cmd(name, **args)
        if name == "migrate":
            self.progress.started()
        elif name == "query-migrate":
            self.progress.seen(result)
            self._cancel_if_asked(result.get("status", "none"))
        return result

    def _cancel_if_asked(self, status: str) -> None:
        if not self.interrupts.requested or self.cancelled or status in TERMINAL:
            return
        if status.startswith("postcopy"):
            if not self._told:
                self._told = True
                self.progress.say("interrupted, but the destination already runs the guest (postcopy): finishing; "
                                  "interrupt again to stop the destination, which loses the guest")
            return
        self.cancelled = True
        self.progress.say("interrupted: cancelling the migration; the guest stays on the source")
        self.cmd("migrate_cancel")


class Hop:
    """One migration of a lab from its current side to `target`."""

    def __init__(self, lab: labs.Lab, plan: MigrationPlan, source_backends: list[BackendProcess],
                 source_config: MachineConfig, target: str, backends: list[BackendProcess],
                 config: MachineConfig) -> None:
        self.lab, self.plan = lab, plan
        self.origin, self.target = lab.vm, target
        self.source_backends, self.source_config = source_backends, source_config
        self.backends, self.config = backends, config
        self.interrupts = Interrupts()
        self.progress = Progress()

    def run(self) -> int:
        lab = self.lab
        print(f"lab {lab.name}: migrating from side {self.origin} to a new side {self.target} "
              f"({describe(self.plan)})", flush=True)
        began = time.monotonic()
        try:
            destination = labs.launch_side(lab, self.target, self.backends, self.config)
        except KeyboardInterrupt:  # launch_side stopped what it had started
            print(f"lab: migration cancelled (interrupted while the destination started); {lab.name} runs on at "
                  f"side {self.origin}", file=sys.stderr)
            return 130
        print(f"  destination started in {time.monotonic() - began:.1f} s: "
              + ", ".join(f"{p.role} pid {p.pid}" for p in lab.side_procs(self.target)), flush=True)
        sampler = self._sampler()
        source = None
        with self.interrupts:
            try:
                source = labs.attach(self.source_config, SourceMonitor(lab, self.progress, self.interrupts))
                sampler.start()
                try:
                    result = migrate(source, destination, self.plan)
                finally:
                    self.interrupts.escalate = False  # from here on the outcome is settled as it is
                landed = self._settle(result, source, destination)
            except BaseException as exc:
                _disconnect(sampler, source)
                raise self._abandon(destination, exc) from None
            _disconnect(sampler, source)
            if landed == self.target:
                self._switch(destination, result)
            else:
                self._drop(destination, result)
        json_path, png_path = timeline.save(sampler, result, lab.dir, f"timeline-{self.target}",
                                            f"lab {lab.name}: {self.origin} -> {self.target}")
        self._report(result, landed, json_path, png_path, time.monotonic() - began)
        if landed == self.target and result.ok:
            return 0
        where = f"{lab.name} runs on at side {landed}"
        if self.interrupts.requested and result.status == "cancelled":
            print(f"lab: migration cancelled (interrupted); {where}", file=sys.stderr)
            return 130
        first = result.problems[0].splitlines()[0] if result.problems else result.status
        raise LabError(f"migration of {lab.name} {result.status} with {len(result.problems)} problem(s): {first}; "
                       f"{where}")

    def _sampler(self) -> timeline.IoSampler:
        """I/O served by each back end process (QEMU's built-in disk has none: phases only)."""
        sampler = timeline.IoSampler()
        for where, side_name in (("source", self.origin), ("destination", self.target)):
            for proc in self.lab.side_procs(side_name):
                if proc.role == "backend":
                    sampler.watch(f"{side_name} back end ({where})", proc.pid)
        return sampler

    def _settle(self, result: MigrationResult, source: Machine, destination: Machine) -> str:
        """Check the sides after migrate(); the side the guest runs on now."""
        if self.interrupts.requested and result.status == "completed":
            self.progress.say("interrupted after the migration completed: switching the lab over")
        if result.status != "completed":
            result.add_problems(self._source_running(source))
            return self.origin
        if self.backends:
            check_backends(result, {self.target: self.backends[0]})
        state = monitor(destination).cmd("query-status")["status"]
        if state != "running":
            if result.mode == "precopy":  # the guest never ran there: the source can take over again
                monitor(source).cmd("cont")
                result.problems.append(f"the destination did not run the guest ({state}): the source was resumed")
                return self.origin
            return self.target  # postcopy: the source's memory is stale, there is no way back
        try:
            destination.wait_ready()  # SSH through the destination's own port forward
        except LabError as exc:
            result.problems.append(f"the guest does not answer SSH on the new side: {exc}")
        return self.target

    def _source_running(self, source: Machine) -> list[str]:
        """QEMU resumes the source itself after a failed or cancelled precopy: give it a moment."""
        deadline = time.monotonic() + RESUME_SECONDS
        while (problems := check_source_running(source)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return problems

    def _switch(self, destination: Machine, result: MigrationResult) -> None:
        """The guest runs on the new side: make it the lab's, stop the old one."""
        lab = self.lab
        self._require_state()
        lab.vm, lab.ssh_port = self.target, destination.ssh_port
        lab.save()
        destination.release()
        lab.retire(self.origin)
        for backend in self.source_backends:  # not our child: its log tells what went wrong
            result.add_problems([f"old side {self.origin}: {p}" for p in backend.finish()])

    def _drop(self, destination: Machine, result: MigrationResult) -> None:
        """The guest stays on its source: stop the destination and forget it."""
        destination.shutdown()
        for backend in self.backends:
            result.add_problems([f"dropped side {self.target}: {p}" for p in backend.finish()])
        self._require_state()
        self.lab.retire(self.target)

    def _abandon(self, destination: Machine, exc: BaseException) -> BaseException:
        """migrate() or the checks broke off (a second interrupt, a QMP error): what to raise,
        after stopping the destination unless it may hold the guest (postcopy)."""
        lab, why = self.lab, "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc).splitlines()[0]
        if self.progress.statuses & {"postcopy-active", "postcopy-paused", "completed"}:
            destination.release()
            self._require_state()
            lab.phase = "failed"
            lab.save()
            return LabError(f"migration of {lab.name} broke off ({why}) after the destination took over: both sides "
                            f"are left as they are for inspection; `lab down {lab.name}` removes them")
        destination.shutdown()
        for backend in self.backends:
            backend.stop()
        self._require_state()
        lab.retire(self.target)
        return LabError(f"migration of {lab.name} broke off ({why}); the destination was stopped; the source is "
                        f"{source_state(lab)}")

    def _require_state(self) -> None:
        if not self.lab.path(labs.STATE_FILE).exists():
            raise LabError(f"lab {self.lab.name} was taken down during the migration")

    def _report(self, result: MigrationResult, landed: str, json_path: Path, png_path: Path, seconds: float) -> None:
        lab = self.lab
        print(f"result:   {result.summary()}")
        print("problems: none" if result.ok else "problems:")
        for problem in result.problems:
            print("  - " + problem.replace("\n", "\n    "))
        print(f"timeline: {png_path}\n          {json_path}")
        if landed == self.target:
            print(f"lab {lab.name} now runs on side {landed} (ssh port {lab.ssh_port}, qmp {lab.qmp_socket}); "
                  f"side {self.origin} stopped; {seconds:.1f} s in all")
        else:
            print(f"lab {lab.name} runs on at side {landed}; the destination {self.target} was stopped; "
                  f"{seconds:.1f} s in all")


def _disconnect(sampler: timeline.IoSampler, source: Machine | None) -> None:
    """Stop sampling and let go of the source's monitor (out of step after an interrupt; QEMU
    serves one monitor client at a time): the source is only quit later, through the lab."""
    sampler.stop()
    if source is not None:
        source.shutdown()  # not our child: this only disconnects


def source_state(lab: labs.Lab) -> str:
    """The run state of the lab's current QEMU through a fresh QMP connection, waiting up to
    RESUME_SECONDS for "running" (a source whose destination died fails the migration and runs
    on)."""
    qmp = QMP(lab.qmp_socket, lab.vm_dir / "qmp.jsonl")
    deadline = time.monotonic() + RESUME_SECONDS
    try:
        qmp.connect(RESUME_SECONDS)
        while (state := qmp.cmd("query-status")["status"]) != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
    except LabError as exc:
        return f"unreachable ({exc})"
    finally:
        qmp.close()
    return state
