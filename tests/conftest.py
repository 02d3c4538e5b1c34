"""Fixtures for the fast tests: vhost-user back ends started as real processes.

Two kinds for blk: "ours" (`python -m lab backend blk ...`) and "qsd" (qemu-storage-daemon's
vhost-user-blk export, the reference implementation). Each back end runs in its own process
group, is waited for through its socket, and is killed at teardown, where a crash or a Python
traceback in its log fails the test. DaemonUnderTest and serving() are the same processes as the
hostile-input tests drive our back ends (imported from here by those test modules).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from lab.backends import BACKEND_KINDS, REPO, BackendProcess, backend_available
from lab.qemu.process import spawn

IMAGE_SIZE = 64 << 20
TIMEOUT = 5.0
BROKEN = "device broken:"


def wait_for(condition: Callable[[], bool], what: str, detail: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} {detail()}")
        time.sleep(0.01)


@dataclass(kw_only=True)
class DaemonUnderTest(BackendProcess):
    """One of our back ends as a daemon that hostile front ends must not harm: ready once it
    logs "listening on"; its open fds then (idle_fds) are what it must return to after each
    front end, and every broken device leaves one "device broken:" line in its log."""

    idle_fds: int = field(default=0, init=False, repr=False)

    def launch(self) -> DaemonUnderTest:
        # unlike BackendProcess, a stale socket file is left in place: replacing it is the back
        # end's job, and tested
        self.proc = spawn(self.argv(), log=self.log, cwd=REPO)
        return self

    def wait_ready(self) -> DaemonUnderTest:
        super().wait_ready()
        try:
            wait_for(lambda: self.proc is None or self.proc.poll() is not None or "listening on" in self.log_text(),
                     "the back end to listen")
            self.check_alive()
        except BaseException:
            self.stop()
            raise
        self.idle_fds = self.fd_count()
        return self

    def wait_idle(self) -> None:
        """Back to the fds of a daemon without a front end: nothing leaked."""
        wait_for(lambda: self.fd_count() == self.idle_fds, f"fd count back to {self.idle_fds}",
                 lambda: f"has {self.fd_count()}: {self.open_fds()}")

    def broken_lines(self) -> list[str]:
        return [line for line in self.log_text().splitlines() if BROKEN in line]


@contextlib.contextmanager
def serving(daemon: DaemonUnderTest) -> Iterator[DaemonUnderTest]:
    """Start `daemon`; when done it must stop with exit status 0 and no traceback in its log."""
    daemon.start()
    try:
        yield daemon
    finally:
        code = daemon.stop()
    assert code == 0, f"back end exit status {code}:\n{daemon.log_text()}"
    assert "Traceback" not in daemon.log_text()


def make_image(path: Path, size: int = IMAGE_SIZE) -> str:
    with open(path, "wb") as image:
        image.truncate(size)
    return str(path)


@pytest.fixture
def start_backend(tmp_path: Path) -> Iterator[Callable[..., BackendProcess]]:
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
    problems = [problem for backend in started for problem in backend.finish()]
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture(params=BACKEND_KINDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def blk_backend(start_backend: Callable[..., BackendProcess], backend_kind: str) -> BackendProcess:
    """A writable 2-queue back end of each kind on a fresh 64 MiB sparse image."""
    return start_backend(backend_kind)
