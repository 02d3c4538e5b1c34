"""Fixtures for the fast tests: vhost-user-blk back ends started as real processes.

Two kinds: "ours" (`python -m lab backend blk ...`) and "qsd" (qemu-storage-daemon's
vhost-user-blk export, the reference implementation). Each back end runs in its own process
group, is waited for through its socket, and is killed at teardown, where a crash or a Python
traceback in its log fails the test.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

BACKEND_KINDS = ("ours", "qsd")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
IMAGE_SIZE = 64 << 20
REPO = Path(__file__).resolve().parents[1]


def backend_available(kind: str) -> str | None:
    """None when `kind` can run here, else why not."""
    if kind == "qsd":
        return None if shutil.which("qemu-storage-daemon") else "qemu-storage-daemon is not installed"
    if importlib.util.find_spec("lab.commands.backend") is None:
        return "lab backend (lab/commands/backend.py) does not exist yet"
    return None


@dataclass
class BackendProcess:
    """One back-end process serving `image` on `socket`."""

    kind: str
    socket: str
    image: str
    log: Path
    queues: int = 2
    read_only: bool = False
    serial: str | None = None
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def argv(self) -> list[str]:
        if self.kind == "ours":
            argv = [sys.executable, "-m", "lab", "backend", "blk", "--socket", self.socket,
                    "--image", self.image, "--queues", str(self.queues)]
            if self.read_only:
                argv.append("--read-only")
            if self.serial is not None:
                argv += ["--serial", self.serial]
            return argv + list(self.extra)
        # QSD has no serial option: its GET_ID answer is fixed ("vhost_user_blk")
        read_only = ",read-only=on" if self.read_only else ""
        return [
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file0,filename={self.image},discard=unmap{read_only}",
            "--export", f"type=vhost-user-blk,id=export0,node-name=file0,addr.type=unix,"
                        f"addr.path={self.socket},writable={'off' if self.read_only else 'on'},"
                        f"num-queues={self.queues}",
            *self.extra,
        ]

    def start(self) -> BackendProcess:
        if os.path.lexists(self.socket):
            os.unlink(self.socket)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=REPO,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._socket_ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} back end exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.kind} back end made no socket in {START_TIMEOUT}s:\n{self.log_tail()}")
            time.sleep(0.02)
        return self

    def stop(self) -> int | None:
        """SIGTERM the process group, SIGKILL after STOP_TIMEOUT; the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT)
        _signal_group(proc.pid, signal.SIGKILL)  # stragglers in the group
        self.proc = None
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL: the back end dies mid-flight, as in a crash (no exit checks)."""
        if self.proc is not None:
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)
            self.proc = None

    def restart(self) -> BackendProcess:
        self.check_alive()
        self.check_exit(self.stop())
        return self.start()

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise AssertionError(f"{self.kind} back end died (exit {code}):\n{self.log_tail()}")

    def check_exit(self, code: int | None) -> None:
        if code not in (0, -signal.SIGTERM, None):
            raise AssertionError(f"{self.kind} back end ended with {code}:\n{self.log_tail()}")
        if "Traceback" in self.log_text():
            raise AssertionError(f"{self.kind} back end logged a traceback:\n{self.log_tail()}")

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


def make_image(path: Path, size: int = IMAGE_SIZE) -> str:
    with open(path, "wb") as image:
        image.truncate(size)
    return str(path)


@pytest.fixture
def backend_factory(tmp_path: Path) -> Iterator[Callable[..., BackendProcess]]:
    """start(kind, image=None, **options) -> a running BackendProcess; all are checked and killed."""
    started: list[BackendProcess] = []

    def start(kind: str, image: str | None = None, **options: object) -> BackendProcess:
        reason = backend_available(kind)
        if reason:
            pytest.skip(reason)
        n = len(started)
        backend = BackendProcess(
            kind=kind,
            # short names: unix socket paths are limited to 107 bytes
            socket=str(tmp_path / f"b{n}.sock"),
            image=image or make_image(tmp_path / f"disk{n}.img"),
            log=tmp_path / f"backend{n}-{kind}.log",
            **options,  # type: ignore[arg-type]
        )
        started.append(backend)
        return backend.start()

    yield start
    errors = []
    for backend in started:
        died = backend.proc is not None and backend.proc.poll() is not None
        code = backend.stop()
        if died:
            errors.append(f"{backend.kind} back end died during the test (exit {code}):\n{backend.log_tail()}")
            continue
        try:
            backend.check_exit(code)
        except AssertionError as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)


@pytest.fixture(params=BACKEND_KINDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def blk_backend(backend_factory: Callable[..., BackendProcess], backend_kind: str) -> BackendProcess:
    """A writable 2-queue back end of each kind on a fresh 64 MiB sparse image."""
    return backend_factory(backend_kind)
