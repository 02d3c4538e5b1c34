"""The daemon under fuzzing: our blk back end as a process, and the properties checked after
every case: alive, back to its idle fds, memory bounded, log clean, next connection works."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lab.backends import BackendProcess
from lab.virtio.blk import BlkDevice
from lab.virtio.vhost_user import VhostUserTransport

TIMEOUT = 5.0  # every reply, every settle; far above what a healthy daemon needs
QUEUES = 2
IMAGE_SIZE = 16 << 20
RSS_GROWTH_KIB = 64 << 10  # anonymous memory the daemon may gain over a whole campaign
BROKEN = "device broken:"
# Log lines that are a finding whatever the input: validation must raise DeviceBroken, not crash.
BUGS = ("internal error", "Traceback", "CRITICAL")


class Finding(AssertionError):
    """A property of the daemon was violated."""


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise Finding(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.002)


@dataclass
class Daemon:
    """`python -m lab backend blk` on a fresh image in `workdir`, for one campaign."""

    workdir: Path
    process: BackendProcess = field(init=False)
    idle_fds: int = 0
    idle_anon_kib: int = 0
    _log_offset: int = 0
    verified: int = 0

    def __post_init__(self) -> None:
        image = self.workdir / "fuzz.img"
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        self.process = BackendProcess(kind="ours", socket=str(self.workdir / "fuzz.sock"), image=str(image),
                                      log=self.workdir / "backend.log", queues=QUEUES)

    @property
    def socket(self) -> str:
        return self.process.socket

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> Daemon:
        self.process.start()
        wait_until(lambda: "listening on" in self.process.log_text(), "the back end to listen")
        self.idle_fds = self.fd_count()
        self.idle_anon_kib = self.process.memory_kib()["RssAnon"]
        self._log_offset = len(self.process.log_text())
        return self

    def stop(self) -> int | None:
        return self.process.stop()

    def fd_count(self) -> int:
        return self.process.fd_count()

    def new_log(self) -> list[str]:
        """Log lines since the last call."""
        text = self.process.log_text()
        fresh, self._log_offset = text[self._log_offset :], len(text)
        return fresh.splitlines()

    def alive(self) -> None:
        if self.process.proc is None or self.process.proc.poll() is not None:
            code = None if self.process.proc is None else self.process.proc.returncode
            raise Finding(f"the back end died (exit {code}):\n{self.process.log_tail()}")

    def settle(self, closed_by_backend: bool) -> list[str]:
        """After a front end went away: the daemon lives, holds only its idle fds, logged one
        "device broken" line exactly when it closed the connection itself, and no bug. Returns
        the new log lines."""
        self.alive()
        try:
            wait_until(lambda: self.fd_count() == self.idle_fds, f"the fd count to return to {self.idle_fds}")
        except Finding:
            fds = self.process.open_fds()
            raise Finding(f"fd leak: {self.fd_count()} open, {self.idle_fds} when idle: {fds}") from None
        if closed_by_backend:  # its log line may trail the close by a moment
            wait_until(lambda: BROKEN in self.process.log_text()[self._log_offset :], "the 'device broken' line")
        lines = self.new_log()
        bugs = [line for line in lines if any(bug in line for bug in BUGS)]
        if bugs:
            raise Finding("the back end logged a bug:\n" + "\n".join(lines[-20:]))
        broken = [line for line in lines if BROKEN in line]
        if len(broken) != int(closed_by_backend):
            what = "closed the connection" if closed_by_backend else "kept the connection"
            raise Finding(f"the back end {what} but logged {len(broken)} 'device broken' lines: {broken}")
        anon = self.process.memory_kib()["RssAnon"]
        if anon > self.idle_anon_kib + RSS_GROWTH_KIB:
            raise Finding(f"anonymous memory grew from {self.idle_anon_kib} to {anon} KiB")
        return lines

    def verified_io(self) -> None:
        """The next front end gets real, verified I/O on both queues."""
        try:
            blk = BlkDevice(VhostUserTransport(self.socket, mem_size=1 << 20, timeout=TIMEOUT), num_queues=QUEUES)
        except Exception as exc:  # whatever the reason, the next front end was refused
            raise Finding(f"the next front end could not connect: {exc}") from None
        try:
            for queue in range(QUEUES):
                stamp = os.urandom(16) * 32
                blk.write(8 + queue, stamp, queue)
                if blk.read(8 + queue, 1, queue) != stamp:
                    raise Finding(f"verified I/O on queue {queue} read back other data")
        except Finding:
            raise
        except Exception as exc:
            raise Finding(f"verified I/O failed on the next connection: {exc}") from None
        finally:
            blk.close()
        self.settle(closed_by_backend=False)
        self.verified += 1
