"""Session hygiene (fixtures/hygiene.py) checked on an inner pytest session: one whose tests fail
and get interrupted (Ctrl-C) while back ends run leaves nothing behind, and one that really leaks
a back end process and a socket directory is caught, cleaned and fails."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from fixtures.hygiene import session_processes
from lab.qemu import process

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120.0

INNER_TESTS = '''
import os, socket, subprocess, sys, tempfile, time
from pathlib import Path

def test_fails_with_back_ends_running(backend_factory):
    backend_factory("ours", "vu0")
    backend_factory("qsd", "vu1")
    assert False, "failing on purpose"

def test_interrupted_with_a_back_end_running(backend_factory):
    backend_factory("ours", "vu0")
    Path(os.environ["INNER_READY"]).write_text("ready")
    time.sleep(300)  # Ctrl-C (SIGINT) from the outer test arrives here

def test_leaks_on_purpose(tmp_path):
    leak = Path(tempfile.mkdtemp(prefix="lab-leak-"))
    socket.socket(socket.AF_UNIX).bind(str(leak / "leaked.sock"))
    image = leak / "disk.img"
    image.write_bytes(bytes(1 << 20))
    proc = subprocess.Popen([sys.executable, "-m", "lab", "backend", "blk", "--socket", str(leak / "vu.sock"),
                             "--image", str(image)], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # no teardown, no parent-death signal
    Path(os.environ["INNER_READY"]).write_text(str(proc.pid))
'''


def _inner(tmp_path: Path, selection: str) -> tuple[subprocess.Popen, Path, Path]:
    project = tmp_path / "inner"
    project.mkdir(exist_ok=True)
    (project / "conftest.py").write_text(  # the lab's own plugins, as the suite loads them
        f'import runpy\npytest_plugins = runpy.run_path({str(REPO / "conftest.py")!r})["pytest_plugins"]\n')
    (project / "test_inner.py").write_text(textwrap.dedent(INNER_TESTS))
    ready, log = tmp_path / f"{selection}.ready", tmp_path / f"{selection}.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "INNER_READY": str(ready),
           "LAB_ARTIFACTS": str(tmp_path / "artifacts")}
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-k", selection, str(project)]
    proc = subprocess.Popen(argv, cwd=project, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, ready, log


def _wait_for(path: Path, proc: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert proc.poll() is None, f"inner pytest ended early:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"inner pytest not ready in {TIMEOUT}s:\n{log.read_text()}"
        time.sleep(0.1)
    return path.read_text()


def _session_id(output: str) -> str:
    found = re.search(r"lab hygiene: session (\w+): ", output)
    assert found, f"no hygiene report in the inner session's output:\n{output}"
    return found.group(1)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan killed after its parent ended waits for a reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _session_dirs() -> list[str]:
    return [p.name for p in Path(tempfile.gettempdir()).iterdir() if re.fullmatch(r"l[0-9a-f]{6}", p.name)]


def test_failed_and_interrupted_session_leaves_nothing(tmp_path: Path) -> None:
    before = _session_dirs()
    proc, ready, log = _inner(tmp_path, "fails or interrupted")
    try:
        _wait_for(ready, proc, log)
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C in the middle of the second test
        code = proc.wait(TIMEOUT)
    finally:
        process.stop_group(proc)
    output = log.read_text()
    assert code == 2, f"exit status {code} (want 2: interrupted):\n{output}"
    assert "1 failed" in output and "KeyboardInterrupt" in output, output
    assert "no lab process, socket or temp dir left" in output, output
    assert not session_processes(_session_id(output))
    assert _session_dirs() == before
    # the evidence of the failure and of the interruption is kept, outside the temp root
    kept = sorted(p.name for p in (tmp_path / "artifacts").iterdir())
    assert len(kept) == 2 and all(list((tmp_path / "artifacts" / k).glob("vu0.*.log")) for k in kept), kept


def test_leaks_are_reported_removed_and_fail_the_session(tmp_path: Path) -> None:
    proc, ready, log = _inner(tmp_path, "leaks")
    try:
        code = proc.wait(TIMEOUT)
    finally:
        process.stop_group(proc)
    output = log.read_text()
    leaked = int(_wait_for(ready, proc, log))
    assert code == 1, f"exit status {code} (want 1: the leak fails the session):\n{output}"
    assert "lab hygiene: LEFT BEHIND" in output and f"process {leaked}:" in output, output
    assert re.search(r"lab-leak-\w+ \(2 sockets\)", output), output
    assert not _running(leaked), "the leaked back end still runs"
    assert not session_processes(_session_id(output))
