"""The lab's command line without guests: argument errors, help, lab state (ls, stale, down)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab import labs
from lab.cli import COMMANDS, build_parser
from lab.qemu.process import spawn

LAB_COMMANDS = ("up", "ls", "ssh", "console", "qmp", "io", "down", "repro", "trace")


def run_lab(*args: str, state: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "LAB_STATE": str(state)}
    return subprocess.run([sys.executable, "-m", "lab", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[1])


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "labs"
    monkeypatch.setenv(labs.STATE_ENV, str(root))
    return root


def test_every_command_is_registered_and_explains_itself() -> None:
    assert set(LAB_COMMANDS) <= set(COMMANDS)
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in LAB_COMMANDS:
        text = sub.choices[name].format_help()
        assert sub.choices[name].description or sub.choices[name].format_usage(), name
        assert len(text.split()) > 20, f"lab {name} --help says too little:\n{text}"


@pytest.mark.parametrize("args, needle", [
    (["up", "--disk", "12Q"], "not a size"),
    (["up", "--backend", "nvme"], "invalid choice"),
    (["up", "--queues", "0"], "at least 1"),
    (["up", "--name", "bad/name"], "lab name"),
    (["down"], "one of the arguments"),
    (["ssh", "nosuchlab"], "no lab named 'nosuchlab'"),
    (["qmp", "nosuchlab", "query-status", "[1]"], "JSON object"),
    (["io", "x"], "one of the arguments --workload --verify"),
    (["trace", "show", "/nonexistent.jsonl"], "cannot read trace"),
    (["repro", "/nonexistent/manifest.json"], "no manifest"),
])
def test_argument_errors_are_one_line(args: list[str], needle: str, state: Path) -> None:
    result = run_lab(*args, state=state)
    assert result.returncode != 0
    assert needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("lab")]) == 1, result.stderr


def detached_sleeper() -> int:
    proc = spawn(["sleep", "600"], detached=True)
    return proc.pid


def make_lab(name: str, pids: list[int], phase: str = "up") -> labs.Lab:
    lab = labs.claim(labs.Lab(name=name, backend="blk", disk="/nonexistent.img", seed=1, phase=phase))
    for pid in pids:
        lab.add(labs.Proc.record("backend", pid, ["sleep", "600"], "/dev/null"))
    lab.owner = 0
    lab.save()
    return lab


def test_ls_tells_running_from_stale_and_down_all_cleans(state: Path) -> None:
    live = detached_sleeper()
    dead = detached_sleeper()
    make_lab("alive", [live])
    make_lab("gone", [dead])
    make_lab("half", [detached_sleeper(), detached_sleeper()])
    os.kill(dead, 9)
    os.waitpid(dead, 0)
    half = labs.Lab.load("half")
    os.kill(half.procs[0].pid, 9)
    os.waitpid(half.procs[0].pid, 0)
    (state / "broken").mkdir()
    (state / "broken" / labs.STATE_FILE).write_text("{not json")

    listing = run_lab("ls", state=state).stdout
    rows = {line.split()[0]: line.split()[1] for line in listing.splitlines()[1:]}
    assert rows == {"alive": "running", "gone": "stale", "half": "degraded", "?": "damaged"}, listing

    result = run_lab("down", "--all", state=state)
    assert result.returncode == 0, result.stderr
    assert "alive: was running; stopped backend pid" in result.stdout
    assert "gone: was stale; state removed" in result.stdout
    assert "broken: damaged state removed" in result.stdout
    assert labs.lab_names() == []
    for pid in (live, half.procs[1].pid):
        os.waitpid(pid, 0)  # our child: reaped here, so it must have died


def test_a_recycled_pid_is_not_ours(state: Path) -> None:
    lab = make_lab("x", [os.getpid()])
    lab.procs[0].start += 1  # the recorded process started at another time: not this one
    lab.save()
    assert labs.Lab.load("x").status() == "stale"
    assert "stopped" not in run_lab("down", "x", state=state).stdout  # and it is never signalled


def test_a_live_lab_name_is_refused(state: Path) -> None:
    pid = detached_sleeper()
    make_lab("busy", [pid])
    try:
        with pytest.raises(labs.LabError, match="already running"):
            labs.claim(labs.Lab(name="busy", backend="blk", disk="", seed=0))
    finally:
        labs.Lab.load("busy").remove()
        os.waitpid(pid, 0)


def test_trace_show_and_replay_of_a_host_session(tmp_path: Path, state: Path) -> None:
    """A session recorded by our blk back end, driven by our host front end with real I/O,
    replays against a fresh back end without a difference; a changed back end shows up."""
    from lab.backends import BackendProcess
    from lab.virtio.blk import BlkDevice
    from lab.virtio.vhost_user import VhostUserTransport

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 << 20))
    trace = tmp_path / "t.jsonl"
    backend = BackendProcess(kind="ours", socket=str(tmp_path / "s.sock"), image=str(image),
                             log=tmp_path / "b.log", queues=2, extra=("--trace", str(trace))).start()
    try:
        device = BlkDevice(VhostUserTransport(backend.socket, mem_size=16 << 20, timeout=5.0), timeout=5.0)
        device.write(8, b"\x5a" * 4096)
        assert device.read(8, 8) == b"\x5a" * 4096
        device.close()
    finally:
        assert backend.finish() == []
    shown = run_lab("trace", "show", str(trace), state=state)
    assert shown.returncode == 0 and "-> SET_MEM_TABLE" in shown.stdout and "<- GET_VRING_BASE" in shown.stdout
    same = run_lab("trace", "replay", str(trace), "--backend", "blk", state=state)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "no difference from the recording" in same.stdout
    assert "came from guest I/O" in same.stdout  # the ring moved in the recording
    ro = run_lab("trace", "replay", str(trace), "--backend", "scsi", state=state)
    assert ro.returncode == 1 and "GET_FEATURES: payload" in ro.stdout, ro.stdout
    kept = re.search(r"replay directory kept: (\S+)", ro.stdout)
    assert kept, ro.stdout  # a replay that differs keeps its directory for inspection
    shutil.rmtree(kept.group(1))
