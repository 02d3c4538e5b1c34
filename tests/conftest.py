"""Fixtures for the fast tests: vhost-user-blk back ends started as real processes.

Two kinds: "ours" (`python -m lab backend blk ...`) and "qsd" (qemu-storage-daemon's
vhost-user-blk export, the reference implementation). Each back end runs in its own process
group, is waited for through its socket, and is killed at teardown, where a crash or a Python
traceback in its log fails the test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from lab.backends import BACKEND_KINDS, BackendProcess, backend_available

IMAGE_SIZE = 64 << 20


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
