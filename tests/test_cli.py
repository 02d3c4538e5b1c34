"""The lab's command line without guests: argument errors, help, lab state (ls, stale, down)."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab import labs
from lab.cli import COMMANDS, build_parser
from lab.errors import LabError
from lab.qemu.process import spawn

LAB_COMMANDS = ("up", "ls", "ssh", "console", "qmp", "io", "migrate", "down", "repro", "trace")


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
    (["migrate", "x", "--bandwidth", "12Q"], "not a bandwidth like 32M"),
    (["migrate", "x", "--bandwidth", "100K"], "at least 1M"),
    (["migrate", "x", "--after-passes", "0"], "at least 1"),
    (["migrate"], "the following arguments are required: name"),
    (["migrate", "nosuchlab", "--postcopy"], "no lab named 'nosuchlab'"),
])
def test_argument_errors_are_one_line(args: list[str], needle: str, state: Path) -> None:
    result = run_lab(*args, state=state)
    assert result.returncode != 0
    assert needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("lab")]) == 1, result.stderr


def test_migration_plans_from_the_flags() -> None:
    from lab.commands.migrate import bandwidth, plan_from
    from lab.migration_job import POSTCOPY, PRECOPY
    from lab.qemu.migration import UNLIMITED

    assert [bandwidth(t) for t in ("32M", "1.5G", "64MiB/s", "1048576", "unlimited")] == [
        32 << 20, 3 << 29, 64 << 20, 1 << 20, UNLIMITED]
    parse = build_parser().parse_args
    assert plan_from(parse(["migrate", "x"])) == PRECOPY
    assert plan_from(parse(["migrate", "x", "--postcopy"])) == dataclasses.replace(POSTCOPY, postcopy_bandwidth=None)
    plan = plan_from(parse(["migrate", "x", "--postcopy", "--after-passes", "3", "--bandwidth", "8M",
                            "--postcopy-bandwidth", "4M"]))
    assert (plan.postcopy, plan.passes, plan.limit_bandwidth, plan.downtime_limit_ms, plan.postcopy_bandwidth) == (
        True, 3, 8 << 20, 1, 4 << 20)
    with pytest.raises(LabError, match="needs --postcopy"):
        plan_from(parse(["migrate", "x", "--postcopy-bandwidth", "4M"]))


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


def test_migrate_refuses_what_it_cannot_move(state: Path) -> None:
    """Labs that are not running, not started by `lab up`, or cannot do postcopy: one line each,
    and the lab is left as it was."""
    pid = detached_sleeper()
    make_lab("gone", [])
    make_lab("recorded", [pid])  # `lab repro --keep`: recorded command lines, no lab up details
    lab = make_lab("qsd", [pid])
    lab.backend, lab.details = "qsd", {"mem_mib": 512, "smp": 2, "queues": 1}
    lab.save()
    try:
        for args, needle in [(["gone"], "lab gone is stale, not running"),
                             (["recorded"], "lab migrate moves labs started by lab up"),
                             (["qsd", "--postcopy"], "qemu-storage-daemon cannot do postcopy")]:
            result = run_lab("migrate", *args, state=state)
            assert result.returncode == 1 and needle in result.stderr, result.stderr
            assert len(result.stderr.splitlines()) == 1 and not result.stdout, result.stderr + result.stdout
        assert labs.Lab.load("qsd").status() == "running" and labs.Lab.load("qsd").vm == "vm"
    finally:
        for name in ("gone", "recorded", "qsd"):
            labs.Lab.load(name).remove()
        os.waitpid(pid, 0)


def test_a_lab_being_migrated(state: Path) -> None:
    """While `lab migrate` works on a lab, `lab ls` says so and other commands wait for it; a
    migration whose command died half-way leaves a degraded lab for `lab down`."""
    pid = detached_sleeper()
    lab = make_lab("moving", [pid])
    lab.phase, lab.owner = "migrating", os.getpid()
    lab.save()
    try:
        assert run_lab("ls", state=state).stdout.splitlines()[1].split()[:2] == ["moving", "migrating"]
        busy = run_lab("ssh", "moving", state=state)
        assert busy.returncode == 1 and "lab moving is migrating, not running" in busy.stderr
        finished = subprocess.Popen(["true"])
        finished.wait()
        lab.owner = finished.pid  # the migrating command is gone
        lab.save()
        assert labs.Lab.load("moving").status() == "degraded"
    finally:
        labs.Lab.load("moving").remove()
        os.waitpid(pid, 0)


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
