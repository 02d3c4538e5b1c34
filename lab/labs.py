"""Labs: guests that `lab up` (or `lab repro --keep`) leaves running, one state directory each.

A lab's directory ($LAB_STATE/NAME, default $LAB_CACHE/labs/NAME) holds everything it started
from: state.json (its processes by pid and start time, how to reach the guest), the guest's
workdir (QMP and console sockets, console log), the back end's socket, log and trace, the disk
image, io.json (the workloads `lab io` started) and manifest.json + repro.sh. The processes are
started detached (no parent-death signal) so they outlive the command; any later `lab` command
finds them by pid, checked against the recorded start time so a recycled pid is never
signalled. A lab whose processes are all gone is stale: `lab ls` says so, `lab down` cleans it.

The guest and its back end form a side: a directory of the lab (`Lab.vm`, "vm" for the first)
with QEMU's workdir and the back end's socket, log and trace. `lab migrate` starts the next
side ("vm1", ...) next to the running one, both recorded while the migration runs, and retires
the side the guest left; every command reaches the guest through `Lab.vm` and `ssh_port`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from images.builder import cache_root
from lab.errors import LabError
from lab.qemu.console import tail

STATE_ENV = "LAB_STATE"
STATE_FILE = "state.json"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
STOP_GRACE = 10.0  # SIGTERM -> SIGKILL
QUIT_SECONDS = 20.0  # QMP quit -> QEMU gone (TCG guests on a busy host are slow to exit)
_POLL = 0.05


def state_root() -> Path:
    env = os.environ.get(STATE_ENV)
    return Path(env) if env else cache_root() / "labs"


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise LabError(f"lab name {name!r}: use up to 32 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on; None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


@dataclasses.dataclass
class Proc:
    """One process a lab started: its own process group (pgid == pid)."""

    role: str  # "qemu" or "backend"
    pid: int
    start: int  # kernel start time: the same pid later is another process
    argv: list[str]
    log: str
    side: str = ""  # the side (Lab.vm) it belongs to; "" in state written before sides existed

    @classmethod
    def record(cls, role: str, pid: int, argv: list[str], log: Path | str, side: str = "") -> Proc:
        start = start_time(pid)
        if start is None:
            raise LabError(f"{role} (pid {pid}) exited right after it started; log {log}:\n{tail(Path(log), 5)}")
        return cls(role, pid, start, list(argv), str(log), side)

    def alive(self) -> bool:
        """Running, and the very process recorded (a zombie nobody reaped counts as gone)."""
        fields = _stat_fields(self.pid)
        return fields is not None and fields[0] != "Z" and int(fields[19]) == self.start

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM its process group, SIGKILL after `grace`; return once it is gone."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if not self.alive():
                return
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                return
            if _wait_until(lambda: not self.alive(), wait):
                return
        raise LabError(f"{self.role} (pid {self.pid}) survived SIGKILL")


def _wait_until(condition: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL)
    return True


@dataclasses.dataclass
class Lab:
    name: str
    backend: str  # blk, scsi, qsd, builtin
    disk: str  # the image the guest's data disk is on
    seed: int  # for `lab io`'s stamps
    key: str = ""  # SSH private key of the guest image
    ssh_port: int | None = None
    guest_serial: str | None = None  # how the guest names the data disk (None: the scsi disk)
    phase: str = "starting"  # starting (lab up at work), up, migrating (lab migrate at work), failed
    owner: int = 0  # pid of the command bringing it up or migrating it, while it works
    created: float = dataclasses.field(default_factory=time.time)
    procs: list[Proc] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # mem, smp, queues, ...
    vm: str = "vm"  # the side the guest runs on: its workdir inside the lab directory

    # -- places --------------------------------------------------------------------------------
    @property
    def dir(self) -> Path:
        return state_root() / self.name

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def vm_dir(self) -> Path:
        return self.path(self.vm)

    @property
    def qmp_socket(self) -> Path:
        return self.vm_dir / "qmp.sock"

    @property
    def console_socket(self) -> Path:
        return self.vm_dir / "console.sock"

    @property
    def console_log(self) -> Path:
        return self.vm_dir / "console.log"

    @property
    def backend_logs(self) -> list[str]:
        return [p.log for p in self.procs if p.role == "backend"]

    def ssh_argv(self, command: list[str] | None = None) -> list[str]:
        if self.ssh_port is None:
            raise LabError(f"lab {self.name} has no SSH port yet (state {self.status()})")
        return ["ssh", "-i", self.key, "-p", str(self.ssh_port), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "root@127.0.0.1", *(command or [])]

    def reach(self) -> str:
        """How a person reaches the running lab."""
        lines = [
            f"lab {self.name} is up ({self.backend} back end, disk {self.disk}, seed {self.seed:#x})",
            f"  ssh:      lab ssh {self.name}    or: {shlex.join(self.ssh_argv())}",
            f"  qmp:      lab qmp {self.name} query-status    socket: {self.qmp_socket}",
            f"  console:  lab console {self.name}    log: {self.console_log}",
        ]
        lines += [f"  back end: log {log}" for log in self.backend_logs]
        lines += [f"  workload: lab io {self.name} --workload stamps; lab io {self.name} --verify",
                  f"  repro:    lab repro {self.path('manifest.json')}",
                  f"  stop:     lab down {self.name}"]
        return "\n".join(lines)

    # -- state -----------------------------------------------------------------------------------
    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = dataclasses.asdict(self)
        temporary = self.path(STATE_FILE + ".tmp")
        temporary.write_text(json.dumps(data, indent=2) + "\n")
        temporary.replace(self.path(STATE_FILE))  # readers never see half a file

    @classmethod
    def load(cls, name: str) -> Lab:
        path = state_root() / check_name(name) / STATE_FILE
        try:
            data = json.loads(path.read_text())
            data["procs"] = [Proc(**p) for p in data.get("procs", [])]
            return cls(**data)
        except FileNotFoundError:
            known = ", ".join(lab_names()) or "none"
            raise LabError(f"no lab named {name!r} (labs: {known})") from None
        except (ValueError, TypeError, KeyError) as exc:
            raise LabError(f"lab {name}: state file {path} is damaged ({exc}); `lab down {name}` removes it") from None

    def add(self, proc: Proc) -> None:
        self.procs.append(proc)
        self.save()

    def status(self) -> str:
        """running, starting, migrating, degraded (some processes gone, or a migration that
        died half-way), failed or stale (all gone)."""
        alive = [p.alive() for p in self.procs]
        if self.phase in ("starting", "migrating") and self.owner and start_time(self.owner) is not None:
            return self.phase
        if self.phase == "up" and alive and all(alive):
            return "running"
        if any(alive):
            return "degraded" if self.phase in ("up", "migrating") else "failed"
        return "stale"

    def require_running(self) -> Lab:
        state = self.status()
        if state != "running":
            raise LabError(f"lab {self.name} is {state}, not running; `lab ls` shows why, `lab down {self.name}` cleans up")
        return self

    def next_side(self) -> str:
        """A name for a new side: vm1, vm2, ... (never one in use or left behind on disk)."""
        taken = {self.vm, *(p.side for p in self.procs)}
        return next(f"vm{n}" for n in range(1, 10_000) if f"vm{n}" not in taken and not self.path(f"vm{n}").exists())

    def side_procs(self, side: str) -> list[Proc]:
        return [p for p in self.procs if (p.side or self.vm) == side]

    # -- teardown --------------------------------------------------------------------------------
    def stop(self, procs: list[Proc] | None = None) -> list[str]:
        """Stop `procs` (default: every process): QEMU first (QMP quit, then signals), back ends
        after it."""
        stopped = []
        for proc in sorted(self.procs if procs is None else procs, key=lambda p: p.role != "qemu"):
            if not proc.alive():
                continue
            if proc.role == "qemu":
                self._quit_qemu(proc)
            proc.stop()
            stopped.append(f"{proc.role} pid {proc.pid}")
        return stopped

    def retire(self, side: str) -> list[str]:
        """Stop the processes of `side` and forget them."""
        procs = self.side_procs(side)
        stopped = self.stop(procs)
        self.procs = [p for p in self.procs if p not in procs]
        self.save()
        return stopped

    def _quit_qemu(self, proc: Proc) -> None:
        from lab.qemu.qmp import QMP  # QMP pulls in qemu.qmp: only for labs that still run

        workdir = self.path(proc.side or self.vm)
        qmp = QMP(workdir / "qmp.sock", workdir / "qmp.jsonl")
        try:
            qmp.connect(5.0, alive=proc.alive)
            qmp.quit(timeout=QUIT_SECONDS)
            _wait_until(lambda: not proc.alive(), QUIT_SECONDS)
        except LabError:
            pass  # no monitor: the signals take over
        finally:
            qmp.close()

    def remove(self) -> list[str]:
        stopped = self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        return stopped


def lab_names() -> list[str]:
    root = state_root()
    if not root.is_dir():
        return []
    return sorted(p.parent.name for p in root.glob(f"*/{STATE_FILE}"))


def all_labs() -> list[Lab | LabError]:
    """Every lab with a state file; a damaged one as the LabError that explains it."""
    found: list[Lab | LabError] = []
    for name in lab_names():
        try:
            found.append(Lab.load(name))
        except LabError as exc:
            found.append(exc)
    return found


def new_name(prefix: str = "lab") -> str:
    taken = set(lab_names())
    return next(f"{prefix}{n}" for n in range(1, 10_000) if f"{prefix}{n}" not in taken)


def claim(lab: Lab) -> Lab:
    """Create `lab`'s directory; a stale lab of the same name is cleaned first, a live one refused."""
    if (lab.dir / STATE_FILE).exists():
        old = Lab.load(lab.name)
        state = old.status()
        if state in ("running", "starting", "degraded"):
            raise LabError(f"lab {lab.name} is already {state}; pick another --name or `lab down {lab.name}`")
        old.remove()
    elif lab.dir.exists():
        shutil.rmtree(lab.dir)
    lab.owner = os.getpid()
    lab.save()
    return lab


def launch_side(lab: Lab, side: str, backends: list[Any], config: Any) -> Any:
    """Start `backends` (BackendProcess) then QEMU (MachineConfig, its workdir lab.path(side))
    detached, recording each process in `lab` as part of `side` as soon as it exists; return the
    launched Machine, not waited for (the caller waits and releases it). On any failure or
    Ctrl-C whatever was started is stopped, reaped and forgotten."""
    from lab.qemu.machine import Machine  # the machine layer: only for commands that boot

    lab.path(side).mkdir(parents=True, exist_ok=True)
    machine = None
    try:
        for backend in backends:
            backend.detached = True
            backend.launch()
            lab.add(Proc.record("backend", backend.pid, backend.argv(), backend.log, side))
            backend.wait_ready()
        config.detached = True
        machine = Machine(config)
        try:
            machine.launch()
        finally:
            if machine.proc is not None and machine.alive():
                lab.add(Proc.record("qemu", machine.pid, machine.argv, config.path("qemu.log"), side))
        return machine
    except BaseException:
        if machine is not None:
            machine.shutdown()
        for backend in backends:
            backend.stop()  # reaps what this process started
        lab.retire(side)
        raise


def bring_up(lab: Lab, backends: list[Any], config: Any) -> Any:
    """Launch the lab's first side (launch_side) and wait for its guest to boot; return the
    ready Machine (the caller releases it). On any failure or Ctrl-C everything started is
    stopped and the lab marked failed."""
    machine = None
    try:
        machine = launch_side(lab, lab.vm, backends, config)
        lab.ssh_port = machine.ssh_port
        lab.save()
        machine.wait_ready()
        return machine
    except BaseException as exc:
        if machine is not None:
            machine.shutdown()
        lab.stop()
        for backend in backends:
            backend.stop()  # reaps what this process started
        lab.phase, lab.owner = "failed", 0
        lab.save()
        if isinstance(exc, LabError):
            raise LabError(f"lab {lab.name} did not come up: {exc}\n(logs in {lab.dir}; `lab down {lab.name}` removes them)") from None
        raise


def attach(config: Any, monitor: Any) -> Any:
    """The lab's running QEMU, started by an earlier command, as a Machine (of `config`, a
    MachineConfig) that talks to it through `monitor` (a QMP, connected here): enough to migrate
    it. The process is not this one's child: shutdown() only disconnects."""
    from lab.qemu.machine import Machine

    machine = Machine(config)
    monitor.connect(10.0)
    machine.qmp = monitor
    return machine
