"""Live migration of one Machine to another, followed through QMP, with a result record.

The destination is a second QEMU started from the source's config with `-incoming defer` (its
own memfd RAM, its own vhost-user back end process on the same image). `migrate()` sets the
capabilities (events, postcopy-ram) and parameters (max-bandwidth, downtime-limit) on both
sides, starts the migration over a unix socket or TCP (loopback, or the address of the
destination's host when that is another one), and follows it through QMP
events and query-migrate: after `passes` dirty-sync passes under the bandwidth limit it switches
to postcopy, lifts the limit (precopy) or cancels. Waits follow progress: a migration whose
status and transferred bytes stop moving for `stall_seconds` fails, however long it took.

"completed" alone proves little (QEMU 7.2 reports it while a destination device is dead), so
the result collects problems from every side: status, destination running, source in
postmigrate, and, added by the caller, back end logs (check_backends) and the guest's verified
I/O (add_problems).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping
from pathlib import Path

from lab.backends import TROUBLE, BackendProcess
from lab.errors import LabError
from lab.qemu.machine import Machine, MachineConfig, Option
from lab.qemu.qmp import QMP

UNLIMITED = 1 << 40  # bytes/s: "no limit" for max-bandwidth
LOOPBACK = "127.0.0.1"  # where a destination on this host listens for a tcp migration
POLL_SECONDS = 0.1
RUNNING_SECONDS = 30.0  # base, scaled by the accelerator: the destination resumes the guest
TERMINAL = ("completed", "failed", "cancelled")
SETTLE_SECONDS = 5.0
FAULTS_LINE = re.compile(r"postcopy ended: faults=(\d+)")


@dataclasses.dataclass(frozen=True)
class MigrationPlan:
    postcopy: bool = False
    limit_bandwidth: int | None = 32 << 20  # bytes/s during the first passes; None: never limited
    passes: int = 3  # dirty-sync passes before the switch to postcopy / the lift / the cancel
    downtime_limit_ms: int = 300  # for postcopy keep it tiny, or precopy may converge before the switch
    # bytes/s of the background page stream once in postcopy (None: unlimited); pages somebody
    # faulted on are sent at once whatever the limit, so a low one leaves pages missing for longer
    postcopy_bandwidth: int | None = None
    transport: str = "unix"  # "unix" (a socket in the destination's workdir) or "tcp" (its address)
    cancel: bool = False  # cancel after `passes` instead of finishing
    stall_seconds: float = 60.0


@dataclasses.dataclass(frozen=True)
class Mark:
    """A moment of the migration, in host wall-clock seconds."""

    t: float
    what: str  # "migrate", "status:<status>", "pass:<n>", "switch:<action>", "destination running"


@dataclasses.dataclass
class MigrationResult:
    mode: str  # what happened: "precopy", "postcopy" or "cancelled"
    status: str
    total_ms: int | None = None
    downtime_ms: int | None = None
    setup_ms: int | None = None
    ram_transferred: int = 0
    dirty_sync_count: int = 0
    postcopy_requests: int = 0
    backend_faults: dict[str, int] = dataclasses.field(default_factory=dict)
    marks: list[Mark] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add_problems(self, problems: list[str]) -> None:
        self.problems.extend(problems)

    def summary(self) -> str:
        parts = [self.mode if self.mode == self.status else f"{self.mode} {self.status}"]
        if self.total_ms is not None:
            parts.append(f"total {self.total_ms / 1000:.1f} s")
        if self.downtime_ms is not None:
            parts.append(f"downtime {self.downtime_ms} ms")
        parts.append(f"{self.ram_transferred / (1 << 20):.0f} MiB in {self.dirty_sync_count} passes")
        if self.mode == "postcopy":
            parts.append(f"{self.postcopy_requests} pages requested, back end faults {self.backend_faults}")
        return ", ".join(parts)

    def to_json(self) -> dict:
        record = dataclasses.asdict(self)
        record["marks"] = [[m.t, m.what] for m in self.marks]
        record["ok"] = self.ok
        return record


def destination_config(source: MachineConfig, name: str, workdir: Path, options: list[Option]) -> MachineConfig:
    """The source's machine with its own workdir and device options (its own back ends),
    waiting for an incoming migration."""
    return dataclasses.replace(source, name=name, workdir=workdir, options=options, incoming="defer")


def migrate(source: Machine, destination: Machine, plan: MigrationPlan, address: str = LOOPBACK) -> MigrationResult:
    """Migrate the running `source` guest into the launched `destination` (incoming=defer);
    over tcp the destination listens on `address`, where the source's host reaches it."""
    src, dst = monitor(source), monitor(destination)
    # postcopy-ram set either way: a guest that arrived by postcopy keeps the capability on, and
    # its next precopy would then fail against a destination without it
    capabilities = [{"capability": "events", "state": True}, {"capability": "postcopy-ram", "state": plan.postcopy}]
    for side in (src, dst):
        side.cmd("migrate-set-capabilities", capabilities=capabilities)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": plan.limit_bandwidth or UNLIMITED,
                                         "max-postcopy-bandwidth": plan.postcopy_bandwidth or 0,
                                         "downtime-limit": plan.downtime_limit_ms})
    if plan.transport == "tcp":
        # port 0: the destination binds a free port itself, on whichever host it runs
        dst.cmd("migrate-incoming", uri=f"tcp:{address}:0")
        uri = _incoming_tcp_uri(dst)
    elif plan.transport == "unix":
        uri = f"unix:{destination.config.socket_path('migration.sock')}"
        dst.cmd("migrate-incoming", uri=uri)
    else:
        raise LabError(f"migration transport {plan.transport!r} is neither unix nor tcp")
    result = MigrationResult(mode="postcopy" if plan.postcopy else "precopy", status="setup")
    result.marks.append(Mark(time.time(), "migrate"))
    src.cmd("migrate", uri=uri)
    info = _follow(source, plan, result)
    _record(result, info, plan)
    if result.status == "completed":
        _check_sides(source, destination, result)
    return result


def _incoming_tcp_uri(dst) -> str:
    """Where the destination listens: query-migrate's socket-address has the port it bound."""
    for address in dst.cmd("query-migrate").get("socket-address", []):
        if address.get("type") == "inet":
            return f"tcp:{address['host']}:{address['port']}"
    raise LabError("the migration destination reports no TCP address it listens on")


def _follow(source: Machine, plan: MigrationPlan, result: MigrationResult) -> dict:
    """Poll query-migrate (and collect events) until a terminal status or a stall."""
    src = monitor(source)
    switched = False
    last, moved = None, time.monotonic()
    while True:
        _collect_events(src, result)
        info = src.cmd("query-migrate")
        status = info.get("status", "none")
        if status in TERMINAL:
            _collect_events(src, result)
            return _settled(src, info)
        if status == "postcopy-paused":
            result.problems.append("postcopy paused: the destination lost its source mid-way (guest stuck)")
            return info
        ram = info.get("ram", {})
        syncs = ram.get("dirty-sync-count", 0)
        if not switched and status == "active" and syncs >= plan.passes:
            switched = True
            _switch(src, plan, result)
        progress = (status, ram.get("transferred"), syncs)
        if progress != last:
            last, moved = progress, time.monotonic()
        elif time.monotonic() - moved > plan.stall_seconds:
            result.problems.append(f"migration stalled in {status} for {plan.stall_seconds:.0f}s; cancelled")
            src.cmd("migrate_cancel")
            return info
        time.sleep(POLL_SECONDS)


def _settled(src, info: dict) -> dict:
    """QEMU 7.2 reports "completed" a moment before it fills in total-time and downtime (0 until
    then): ask again until they are there."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while info.get("status") == "completed" and not info.get("total-time") and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS / 10)
        info = src.cmd("query-migrate")
    return info


def _switch(src, plan: MigrationPlan, result: MigrationResult) -> None:
    if plan.cancel:
        action = "cancel"
        src.cmd("migrate_cancel")
    elif plan.postcopy:
        action = "postcopy"
        src.cmd("migrate-start-postcopy")
    else:
        action = "unlimited bandwidth"
        src.cmd("migrate-set-parameters", **{"max-bandwidth": UNLIMITED})
    result.marks.append(Mark(time.time(), f"switch:{action}"))


def _collect_events(qmp, result: MigrationResult) -> None:
    for event in qmp.events():
        stamp = event.get("timestamp", {})
        t = stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1e6 or time.time()
        data = event.get("data", {})
        if event.get("event") == "MIGRATION":
            result.marks.append(Mark(t, f"status:{data.get('status')}"))
        elif event.get("event") == "MIGRATION_PASS":
            result.marks.append(Mark(t, f"pass:{data.get('pass')}"))


def _record(result: MigrationResult, info: dict, plan: MigrationPlan) -> None:
    ram = info.get("ram", {})
    result.status = info.get("status", "none")
    result.total_ms = info.get("total-time")
    result.downtime_ms = info.get("downtime")
    result.setup_ms = info.get("setup-time")
    result.ram_transferred = ram.get("transferred", 0)
    result.dirty_sync_count = ram.get("dirty-sync-count", 0)
    result.postcopy_requests = ram.get("postcopy-requests", 0)
    if result.status == "cancelled":
        result.mode = "cancelled"
    elif plan.postcopy and not any(m.what == "status:postcopy-active" for m in result.marks):
        result.mode = "precopy"  # converged before the switch
    if result.status != ("cancelled" if plan.cancel else "completed"):
        detail = info.get("error-desc", "")
        result.problems.append(f"migration ended {result.status}" + (f": {detail}" if detail else ""))


def _check_sides(source: Machine, destination: Machine, result: MigrationResult) -> None:
    """Completed means: destination running, source in postmigrate."""
    deadline = time.monotonic() + destination.scaled(RUNNING_SECONDS)
    while (state := monitor(destination).cmd("query-status")["status"]) != "running":
        if time.monotonic() > deadline or state in ("internal-error", "guest-panicked", "shutdown"):
            result.problems.append(f"destination is {state!r}, not running")
            break
        time.sleep(POLL_SECONDS)
    else:
        result.marks.append(Mark(time.time(), "destination running"))
    state = monitor(source).cmd("query-status")["status"]
    if state != "postmigrate":
        result.problems.append(f"source is {state!r}, not postmigrate")


def check_backends(result: MigrationResult, backends: Mapping[str, BackendProcess]) -> None:
    """Add each back end's postcopy fault count, and any trouble in its log, to the result."""
    for name, backend in backends.items():
        text = backend.log_text()
        faults = [int(n) for n in FAULTS_LINE.findall(text)]
        if faults:
            result.backend_faults[name] = sum(faults)
        bad = [line for line in text.splitlines() if TROUBLE[backend.kind].search(line)]
        if bad:
            result.problems.append(f"back end {name} logged trouble: " + " | ".join(bad[:3]))
        if backend.proc is None or backend.proc.poll() is not None:
            result.problems.append(f"back end {name} is not running")


def check_source_running(source: Machine) -> list[str]:
    """After a cancel the source must run on."""
    state = monitor(source).cmd("query-status")["status"]
    return [] if state == "running" else [f"source is {state!r} after the cancel, not running"]


def monitor(machine: Machine) -> QMP:
    """The machine's connected QMP; LabError if it has none."""
    if machine.qmp is None or not machine.qmp.connected:
        raise LabError(f"machine {machine.config.name} has no QMP connection")
    return machine.qmp
