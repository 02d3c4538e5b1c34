"""A guest whose migratable disk is served by a back end process, moved from machine to machine.

One job = one guest and one disk image. Each side is a QEMU machine plus its own back end
process on that same image (blk: ours or qemu-storage-daemon; scsi: ours); a hop starts the
next side with `-incoming defer`, migrates into it while the I/O sampler watches both back
ends, checks both sides and the back end logs, saves the timeline (JSON + PNG) in the job's
directory, and retires the old side (or, after a cancel, the new one). A hop may place the new
side on another host reached by SSH (lab.remote), the disk image on storage both share. Used by
the migration scenarios, `lab bench migration` and `lab demo`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from images import ImageInfo
from lab.backends import SCSI_KIND, BackendProcess, ScsiLun
from lab.errors import LabError
from lab.guest.liveio import LiveIO, LiveIOConfig
from lab.guest.ssh import GuestSSH
from lab.qemu import timeline
from lab.qemu.machine import (
    Machine,
    MachineConfig,
    Option,
    vhost_user_blk_disk,
    vhost_user_scsi_disk,
)
from lab.qemu.migration import (
    LOOPBACK,
    MigrationPlan,
    MigrationResult,
    check_backends,
    check_source_running,
    destination_config,
    migrate,
)
from lab.remote import RemoteBackend, RemoteHost, RemoteMachine

# The plans and workloads the scenarios, `lab bench migration` and `lab demo` share.
PRECOPY = MigrationPlan(limit_bandwidth=32 << 20, passes=4)  # several bandwidth-limited passes, then the lift
# Postcopy from the first pass on (a 1 ms downtime limit keeps precopy from converging first):
# most of the guest's RAM is still on the source when the destination runs. The background
# stream is slowed to 4 MiB/s: unlimited, it brought every page over while the TCG guest was
# still stalled on its own faults, and the device never met a missing page (back end faults 0,
# measured); slowed, the device waits for 10-20 pages per migration.
POSTCOPY = MigrationPlan(postcopy=True, limit_bandwidth=32 << 20, passes=1, downtime_limit_ms=1,
                         postcopy_bandwidth=4 << 20)


def read_heavy(seed: int) -> LiveIOConfig:
    """Reads flat out into a ring of buffers the device fills, a write every ~10 ms."""
    return LiveIOConfig(seed=seed, write_pause=0.01)


def write_heavy(seed: int) -> LiveIOConfig:
    """Four writers flat out, each from 2 MiB of buffers filled ahead in shuffled order, so after
    a switch to postcopy the device meets buffers whose pages have not arrived yet."""
    return LiveIOConfig(seed=seed, read_pause=0.01, pool=512, write_threads=4)


SERIAL = "lab-migrate"
CHARDEV = "vu"  # the same on every side: the device is the same device
AFTER_MIGRATION_OPS = 200  # the guest must do this much I/O on its new side to count as alive
ALIVE_SECONDS = 60.0  # base, scaled by the accelerator


@dataclasses.dataclass
class Side:
    name: str
    machine: Machine
    backend: BackendProcess
    host: RemoteHost | None = None  # None: this host


def _incoming_address(source: Side, destination: Side) -> str:
    """Where `destination` listens for the migration stream from `source`: its host's address,
    or, on this host, the address the source's host reaches this one on."""
    if destination.host is not None:
        return destination.host.address
    return LOOPBACK if source.host is None else source.host.local_address


@dataclasses.dataclass(frozen=True)
class JobConfig:
    image: ImageInfo
    workdir: Path
    disk: Path  # the raw image both sides' back ends serve
    kind: str = "ours"  # "ours", "qsd" (vhost-user-blk) or "scsi" (our vhost-user-scsi)
    queues: int = 2
    mem_mib: int = 512
    faults: tuple[str, ...] = ()  # our back ends' --fault flags, on every side
    trace: bool = True  # our back ends write the vhost-user message trace
    expect_trouble: bool = False  # a fault or a known bug will make back ends log errors


@dataclasses.dataclass
class Hop:
    result: MigrationResult
    timeline_json: Path
    timeline_png: Path


class MigrationJob:
    def __init__(self, config: JobConfig) -> None:
        self.config = config
        self.sides: list[Side] = []
        self.retired: list[Side] = []
        self._count = 0

    @property
    def current(self) -> Side:
        if not self.sides:
            raise LabError("the migration job has no running guest (call boot)")
        return self.sides[-1]

    @property
    def ssh(self) -> GuestSSH:
        return self.current.machine.ssh

    def boot(self) -> Side:
        """The first side: back end, then a guest booted with the disk."""
        side = self._side(incoming=False)
        side.machine.wait_ready()
        return side

    def device(self) -> str:
        """The guest's /dev path of the migrated disk."""
        if self.config.kind == SCSI_KIND:
            found = self.ssh.run("ls -d /sys/block/sd* 2>/dev/null | sed 's|.*/|/dev/|'", check=False).stdout.split()
            if len(found) != 1:
                raise LabError(f"guest has {len(found)} scsi disks, expected 1: {found}")
            return found[0]
        return self.ssh.disk_by_serial(self.current.backend.guest_serial)

    def hop(self, plan: MigrationPlan, liveio: LiveIO | None = None, title: str = "migration",
            host: RemoteHost | None = None) -> Hop:
        """Migrate the guest to a new side, on this host or on `host` (over tcp when either
        side is on another host); on success the old side is retired, after a cancel the new
        one. The result's problems include everything the checks found."""
        if (host is not None or self.current.host is not None) and plan.transport != "tcp":
            raise LabError("a side on another host is reached over tcp: use a plan with transport='tcp'")
        source = self.current
        destination = self._side(incoming=True, host=host)
        sampler = timeline.IoSampler()
        for side, role in ((source, "source"), (destination, "destination")):
            if side.host is None:  # the sampler reads this host's /proc
                sampler.watch(f"{side.name} back end ({role})", side.backend.pid)
        sampler.start()
        try:
            result = migrate(source.machine, destination.machine, plan, _incoming_address(source, destination))
            if result.status == "completed":
                self._after_completion(result, source, destination, liveio)
            elif result.status == "cancelled":
                self._after_cancel(result, source, destination, liveio)
            elif result.status == "postcopy-paused":
                # the guest is split between both sides for good and their vCPUs wait for pages
                # that will never come: a QMP quit would only time out
                for side in (destination, source):
                    side.machine.kill()
        finally:
            sampler.stop()
        stem = f"timeline-{destination.name}"
        json_path, png_path = timeline.save(sampler, result, self.config.workdir, stem, title)
        return Hop(result, json_path, png_path)

    def _after_completion(self, result: MigrationResult, source: Side, destination: Side,
                          liveio: LiveIO | None) -> None:
        check_backends(result, {source.name: source.backend, destination.name: destination.backend})
        if result.problems:
            return
        try:
            destination.machine.wait_ready()  # SSH through the destination's own port forward
        except LabError as exc:
            result.problems.append(f"destination guest unreachable after the migration: {exc}")
            return
        if liveio is not None:
            try:
                liveio.wait_for_more(destination.machine.ssh, AFTER_MIGRATION_OPS,
                                     destination.machine.scaled(ALIVE_SECONDS))
            except LabError as exc:
                result.problems.append(f"guest I/O after the migration: {exc}")
        self._retire(source, result)

    def _after_cancel(self, result: MigrationResult, source: Side, destination: Side,
                      liveio: LiveIO | None) -> None:
        result.add_problems(check_source_running(source.machine))
        check_backends(result, {source.name: source.backend})
        self._retire(destination, result)  # the source is current again
        if liveio is not None:
            try:
                liveio.wait_for_more(source.machine.ssh, AFTER_MIGRATION_OPS, source.machine.scaled(ALIVE_SECONDS))
            except LabError as exc:
                result.problems.append(f"guest I/O after the cancel: {exc}")

    def _retire(self, side: Side, result: MigrationResult) -> None:
        self.sides.remove(side)
        self.retired.append(side)
        side.machine.shutdown()
        problems = side.backend.finish(self.config.expect_trouble)
        result.add_problems([f"retired side {side.name}: {p}" for p in problems])

    def _side(self, incoming: bool, host: RemoteHost | None = None) -> Side:
        cfg = self.config
        name = f"vm{self._count}"
        self._count += 1
        backend = self._backend(name)
        if host is not None:
            backend = RemoteBackend.on(host, backend)
        backend.start()
        options = self._options(backend)
        if incoming:
            config = destination_config(self.current.machine.config, name, cfg.workdir / name, options)
        else:
            config = MachineConfig(name, cfg.image, cfg.workdir / name, mem_mib=cfg.mem_mib, options=options)
        if host is None:
            machine = Machine(config)
        else:  # with the source's accelerator: the other host cannot be probed from here
            machine = RemoteMachine(dataclasses.replace(config, accel=self.current.machine.accel), host)
        side = Side(name, machine, backend, host)
        self.sides.append(side)
        side.machine.launch()
        return side

    def _backend(self, name: str) -> BackendProcess:
        cfg = self.config
        extra: tuple[str, ...] = ()
        if cfg.kind != "qsd":
            extra = tuple(arg for fault in cfg.faults for arg in ("--fault", fault))
            if cfg.trace:
                extra += ("--trace", str(cfg.workdir / f"{name}.trace.jsonl"))
        elif cfg.faults:
            raise LabError("fault flags exist only on our back ends")
        common = dict(socket=str(cfg.workdir / f"{name}.sock"), log=cfg.workdir / f"{name}.{cfg.kind}.log",
                      queues=cfg.queues, extra=extra)
        if cfg.kind == SCSI_KIND:
            return BackendProcess(kind=SCSI_KIND, luns=(ScsiLun(0, 0, str(cfg.disk)),), **common)
        return BackendProcess(kind=cfg.kind, image=str(cfg.disk), serial=SERIAL if cfg.kind == "ours" else None,
                              shared_image=True, **common)

    def _options(self, backend: BackendProcess) -> list[Option]:
        if self.config.kind == SCSI_KIND:
            return vhost_user_scsi_disk(CHARDEV, backend.socket, self.config.queues)
        return vhost_user_blk_disk(CHARDEV, backend.socket, self.config.queues)

    def close(self) -> list[str]:
        """Stop every machine, then every back end; what went wrong with the back ends."""
        problems: list[str] = []
        for side in reversed(self.sides):
            side.machine.shutdown()
        for side in reversed(self.sides):
            problems += side.backend.finish(self.config.expect_trouble)
        self.sides.clear()
        return problems
