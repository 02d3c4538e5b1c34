"""vhost-user back ends as processes, for tests and benches.

Three kinds: "ours" (`python -m lab backend blk ...`), "qsd" (qemu-storage-daemon's
vhost-user-blk export, the reference implementation) and "scsi" (`python -m lab backend scsi
...`, our vhost-user-scsi serving the logical units in `luns`). Each back end runs in its own process
group (started through lab.qemu.process.spawn, so it also dies with the lab), is waited for
through its socket, and is killed by stop(); finish() and close() turn a crash, an unclean exit or
trouble in its log (TROUBLE) into problems.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lab.errors import LabError
from lab.qemu.process import spawn, stop_group

BACKEND_KINDS = ("ours", "qsd")  # the vhost-user-blk kinds, compared with each other
SCSI_KIND = "scsi"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
REPO = Path(__file__).resolve().parents[1]
# A back end's log lines that mean something went wrong: ours logs one ERROR line per broken
# device; qemu-storage-daemon panics through vu_panic.
TROUBLE = {
    "ours": re.compile(r" ERROR |device broken|Traceback"),
    "qsd": re.compile(r"vu_panic|[Aa]ssertion|Traceback"),
}
TROUBLE[SCSI_KIND] = TROUBLE["ours"]
_CLEAN_EXIT = (0, -signal.SIGTERM, None)
# qemu-storage-daemon answers GET_ID with this fixed string (QEMU 7.2 has no option to set it).
QSD_SERIAL = "vhost_user_blk"


class BackendError(LabError):
    """A back end did not start, died, or left evidence of a crash in its log."""


def backend_available(kind: str) -> str | None:
    """None when `kind` can run here, else why not."""
    if kind == "qsd":
        return None if shutil.which("qemu-storage-daemon") else "qemu-storage-daemon is not installed"
    if importlib.util.find_spec("lab.commands.backend") is None:
        return "lab backend (lab/commands/backend.py) does not exist yet"
    return None


@dataclass(frozen=True)
class ScsiLun:
    """One logical unit of a "scsi" back end: target:lun on a raw image."""

    target: int
    lun: int
    image: str
    read_only: bool = False

    @property
    def address(self) -> str:
        return f"{self.target}:{self.lun}"

    def spec(self) -> str:
        """The back end's `--lun T:L=FILE[,ro]` value."""
        if "," in self.image:
            raise BackendError(f"LUN {self.address}: image path {self.image!r} contains a comma")
        return f"{self.address}={self.image}" + (",ro" if self.read_only else "")


@dataclass(kw_only=True)
class BackendProcess:
    """One back-end process on `socket`: blk kinds serve `image`, the scsi kind serves `luns`."""

    kind: str
    socket: str
    log: Path
    image: str = ""
    luns: tuple[ScsiLun, ...] = ()
    queues: int = 2
    read_only: bool = False  # blk kinds; a scsi LUN has its own
    serial: str | None = None  # "ours" only
    # another back end serves the same image at the same time (a migration's two sides): qsd then
    # opens it without image locking (ours never locks)
    shared_image: bool = False
    extra: tuple[str, ...] = ()
    detached: bool = False  # may outlive this process (`lab up`); its owner records the pid
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def argv(self) -> list[str]:
        if self.kind == SCSI_KIND:
            return self._scsi_argv()
        if not self.image or self.luns:
            raise BackendError(f"a {self.kind} back end serves one image, not LUNs")
        if self.kind == "ours":
            argv = [sys.executable, "-m", "lab", "backend", "blk", "--socket", self.socket,
                    "--image", self.image, "--queues", str(self.queues)]
            if self.read_only:
                argv.append("--read-only")
            if self.serial is not None:
                argv += ["--serial", self.serial]
            return argv + list(self.extra)
        if self.kind != "qsd":
            raise BackendError(
                f"unknown back end kind {self.kind!r} (known: {', '.join((*BACKEND_KINDS, SCSI_KIND))})"
            )
        # QSD has no serial option: its GET_ID answer is fixed ("vhost_user_blk")
        read_only = ",read-only=on" if self.read_only else ""
        locking = ",locking=off" if self.shared_image else ""
        return [
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file0,filename={self.image},discard=unmap{read_only}{locking}",
            "--export", f"type=vhost-user-blk,id=export0,node-name=file0,addr.type=unix,"
                        f"addr.path={self.socket},writable={'off' if self.read_only else 'on'},"
                        f"num-queues={self.queues}",
            *self.extra,
        ]

    def _scsi_argv(self) -> list[str]:
        if self.image or self.read_only or self.serial is not None:
            raise BackendError("a scsi back end takes LUNs (each with its own read-only flag), not image/serial")
        if not self.luns:
            raise BackendError("a scsi back end needs at least one LUN")
        argv = [sys.executable, "-m", "lab", "backend", "scsi", "--socket", self.socket, "--queues", str(self.queues)]
        for lun in self.luns:
            argv += ["--lun", lun.spec()]
        return argv + list(self.extra)

    @property
    def guest_serial(self) -> str:
        """What the guest reads in /sys/block/DEV/serial for this back end."""
        return QSD_SERIAL if self.kind == "qsd" else self.serial or ""

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BackendError(f"{self.kind} back end is not running")
        return self.proc.pid

    def start(self) -> BackendProcess:
        return self.launch().wait_ready()

    def launch(self) -> BackendProcess:
        """Start the process without waiting for its socket (wait_ready), so several start at once."""
        if os.path.lexists(self.socket):
            os.unlink(self.socket)
        self.proc = spawn(self.argv(), log=self.log, cwd=REPO, detached=self.detached)
        return self

    def wait_ready(self) -> BackendProcess:
        """Wait until the socket exists; a back end that exits or takes too long is an error."""
        if self.proc is None:
            raise BackendError(f"{self.kind} back end was not launched")
        deadline = time.monotonic() + START_TIMEOUT
        while not self._socket_ready():
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise BackendError(f"{self.kind} back end exited with {code}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise BackendError(f"{self.kind} back end made no socket in {START_TIMEOUT}s:\n{self.log_tail()}")
            time.sleep(0.02)
        return self

    def stop(self) -> int | None:
        """SIGTERM the process group, SIGKILL after STOP_TIMEOUT; the exit status."""
        proc = self.proc
        if proc is None:
            return None
        code = stop_group(proc, STOP_TIMEOUT)
        _signal_group(proc.pid, signal.SIGKILL)  # stragglers in the group
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL: the back end dies mid-flight, as in a crash (no exit checks)."""
        if self.proc is not None:
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)
            self.proc = None

    def restart(self) -> BackendProcess:
        self.close()
        return self.start()

    def close(self) -> None:
        """Stop the back end; BackendError if anything went wrong during its life."""
        problems = self.finish()
        if problems:
            raise BackendError("\n".join(problems))

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise BackendError(f"{self.kind} back end died (exit {code}):\n{self.log_tail()}")

    def finish(self, expect_errors: bool = False) -> list[str]:
        """Stop the back end; what went wrong with it during its life (empty: all well)."""
        died = self.proc is not None and self.proc.poll() is not None
        code = self.stop()
        found = []
        if died:
            found.append(f"{self.kind} back end on {self.socket} died (exit {code}):\n{self.log_tail()}")
        elif code not in _CLEAN_EXIT:
            found.append(f"{self.kind} back end on {self.socket} exited with {code} when stopped")
        if not expect_errors:
            bad = [line for line in self.log_text().splitlines() if TROUBLE[self.kind].search(line)]
            if bad:
                found.append(f"{self.kind} back end on {self.socket} logged trouble:\n  " + "\n  ".join(bad[:10]))
        return found

    def memory_kib(self) -> dict[str, int]:
        """VmHWM (peak), VmRSS, RssAnon and RssShmem of the back end, in KiB (/proc/PID/status)."""
        wanted = ("VmHWM", "VmRSS", "RssAnon", "RssShmem")
        values: dict[str, int] = {}
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    key, _, rest = line.partition(":")
                    if key in wanted:
                        values[key] = int(rest.split()[0])
        except FileNotFoundError:
            raise BackendError(f"{self.kind} back end (pid {self.pid}) is gone:\n{self.log_tail()}") from None
        return values

    def reset_peak_memory(self) -> None:
        """Start a new VmHWM period: the peak drops to the current RSS (proc(5), clear_refs 5)."""
        with open(f"/proc/{self.pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")

    def fd_count(self) -> int:
        """How many fds the back end holds open now."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def open_fds(self) -> dict[str, str]:
        """The back end's open fds and what each refers to ("?": closed while looking)."""
        return {fd: _fd_target(self.pid, fd) for fd in sorted(os.listdir(f"/proc/{self.pid}/fd"), key=int)}

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _socket_ready(self) -> bool:
        try:
            return stat.S_ISSOCK(os.stat(self.socket).st_mode)
        except FileNotFoundError:
            return False


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _fd_target(pid: int, fd: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return "?"
