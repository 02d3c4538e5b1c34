"""The lab's command line end to end, as a person uses it: separate `lab` processes, real guests.

`lab up` leaves a guest and its back end running after the command returns; `lab ls`, `lab ssh`,
`lab qmp`, `lab io` (stamped writes in the background, then verified bit for bit in the host's
image) and `lab trace replay` of the live session work on it; `lab migrate` moves it to new sides
while the stamped writes go on (a Ctrl-C cancels and leaves it where it was; precopy after
postcopy works) and every command follows it; `lab down --all` leaves no process.
A deliberately failing scenario gets one failure report block and `lab repro` fails the same way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from lab import labs
from lab.vhost_user import postcopy

pytestmark = [pytest.mark.boot]

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600.0
PLUGINS = ("fixtures.artifacts", "fixtures.report", "fixtures.image", "fixtures.machine", "fixtures.backend")


def run_lab(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "lab", *args], capture_output=True, text=True, env=env,
                            timeout=TIMEOUT, cwd=REPO)
    if check:
        assert result.returncode == 0, f"lab {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture
def lab_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """$LAB_STATE of these labs; whatever a failing test left up is taken down."""
    state = tmp_path / "s"
    monkeypatch.setenv(labs.STATE_ENV, str(state))
    env = {**os.environ, labs.STATE_ENV: str(state), "LAB_ARTIFACTS": str(tmp_path / "artifacts")}
    yield env
    for name in labs.lab_names():
        labs.Lab.load(name).remove()


def test_up_io_trace_migrate_down(lab_env: dict, tmp_path: Path) -> None:
    up = run_lab("up", "--name", "e2e", "--disk", "64M", "--queues", "2", "--mem", "512M", env=lab_env)
    assert "lab e2e is up (blk back end" in up.stdout
    assert "lab ssh e2e" in up.stdout and "qmp.sock" in up.stdout and "backend.log" in up.stdout
    lab = labs.Lab.load("e2e")
    assert [p.role for p in lab.procs] == ["backend", "qemu"] and all(p.alive() for p in lab.procs)
    every = list(lab.procs)  # every process of every side: none may survive `lab down`

    listing = run_lab("ls", env=lab_env).stdout
    assert listing.splitlines()[1].split()[:3] == ["e2e", "running", "blk"], listing
    assert run_lab("ssh", "e2e", "cat", "/sys/block/vdb/serial", env=lab_env).stdout.strip() == "lab-e2e"
    assert json.loads(run_lab("qmp", "e2e", "query-status", env=lab_env).stdout)["status"] == "running"

    run_lab("qmp", "e2e", "stop", env=lab_env)  # the devices stop: GET_VRING_BASE is in the trace
    trace = tmp_path / "session.jsonl"
    shutil.copy(lab.vm_dir / "trace.jsonl", trace)
    run_lab("qmp", "e2e", "cont", env=lab_env)
    shown = run_lab("trace", "show", str(trace), env=lab_env).stdout
    assert "-> SET_MEM_TABLE" in shown and "<- GET_VRING_BASE" in shown
    replay = run_lab("trace", "replay", str(trace), "--backend", "blk", env=lab_env)
    assert "no difference from the recording" in replay.stdout

    # stamped writes in the guest across the migrations below (a pass takes 1-2 s under TCG)
    started = run_lab("io", "e2e", "--workload", "stamps", "--blocks", "300", "--stride", "3", "--passes", "40",
                      "--background", env=lab_env)
    assert "running in the background" in started.stdout
    cancel_with_ctrl_c(lab_env, lab)

    hops = [("vm2", ["--bandwidth", "64M"])]  # vm1 was the cancelled destination: its logs stay
    if postcopy.probe() is None:  # then precopy again: the new source must drop postcopy-ram
        hops += [("vm3", ["--postcopy"]), ("vm4", [])]
    for side, flags in hops:
        old = labs.Lab.load("e2e")
        moved = run_lab("migrate", "e2e", *flags, env=lab_env).stdout
        mode = "postcopy" if "--postcopy" in flags else "precopy"
        assert f"lab e2e: migrating from side {old.vm} to a new side {side} ({mode}" in moved, moved
        assert re.search(r"^ +\d+\.\d s  (active|postcopy-active) +pass \d+ +\d+\.\d MiB sent", moved, re.M), moved
        assert f"result:   {mode} completed" in moved and "problems: none" in moved, moved
        assert f"lab e2e now runs on side {side}" in moved, moved
        png, data = re.search(r"timeline: (\S+\.png)\n +(\S+\.json)", moved).groups()
        recorded = json.loads(Path(data).read_text())
        assert Path(png).stat().st_size > 10_000 and recorded["result"]["ok"], recorded["result"]
        assert set(recorded["series"]) == {f"{old.vm} back end (source)", f"{side} back end (destination)"}
        new = labs.Lab.load("e2e")
        assert new.vm == side and new.status() == "running" and new.ssh_port != old.ssh_port
        assert [(p.role, p.side) for p in new.procs] == [("backend", side), ("qemu", side)]
        assert not any(p.alive() for p in old.procs), "the old side was not stopped"
        every += new.procs
        assert run_lab("ssh", "e2e", "cat", "/sys/block/vdb/serial", env=lab_env).stdout.strip() == "lab-e2e"
        assert json.loads(run_lab("qmp", "e2e", "query-status", env=lab_env).stdout)["status"] == "running"
        if side == "vm2":
            assert run_lab("ssh", "e2e", "test -e /root/lab-io-1.rc || echo writing", env=lab_env).stdout.strip() \
                == "writing", "the workload ended before the first migration: it proves nothing about the new side"
    use_console(lab_env, "e2e")  # on the side the guest moved to
    verified = run_lab("io", "e2e", "--verify", env=lab_env)  # waits for the writer, then checks the image
    assert "verified: 300 stamped blocks of 1 workloads bit-exact" in verified.stdout
    run_lab("io", "e2e", "--workload", "stamps", "--blocks", "100", "--first-lba", "2000", env=lab_env)
    verified = run_lab("io", "e2e", "--verify", env=lab_env)
    assert "verified: 400 stamped blocks of 2 workloads bit-exact" in verified.stdout
    with open(lab.disk, "r+b") as disk:  # the verifier must notice a damaged block
        disk.seek(3 * 4096 + 100)
        disk.write(b"!")
    damaged = run_lab("io", "e2e", "--verify", env=lab_env, check=False)
    assert damaged.returncode == 1 and "block 3: corrupt" in damaged.stdout

    manifest = json.loads(lab.path("manifest.json").read_text())
    assert manifest["machines"][0]["argv"][0] == "qemu-system-x86_64" and manifest["seeds"]["seed"] == lab.seed
    assert manifest["workloads"][0]["generations"] == list(range(1, 41)) and lab.path("repro.sh").stat().st_mode & 0o100

    down = run_lab("down", "--all", env=lab_env)
    assert "e2e: was running; stopped qemu pid" in down.stdout
    assert not any(p.alive() for p in every) and not lab.dir.exists()
    assert not processes_naming(lab.dir), "a process of the lab survived lab down"
    assert "no labs" in run_lab("ls", env=lab_env).stdout


def cancel_with_ctrl_c(lab_env: dict, lab: labs.Lab) -> None:
    """Ctrl-C in the terminal during a (slow) precopy: cancelled, the destination gone, the guest
    where it was, exit status 130."""
    before = labs.Lab.load(lab.name)
    child = pexpect.spawn(sys.executable, ["-m", "lab", "migrate", lab.name, "--bandwidth", "1M"], env=lab_env,
                          cwd=str(REPO), encoding="utf-8", timeout=120)
    try:
        child.expect(r"active +pass 1 ")
        destination = [p for p in labs.Lab.load(lab.name).procs if p.side == "vm1"]
        assert [p.role for p in destination] == ["backend", "qemu"] and all(p.alive() for p in destination)
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    out = child.before
    assert child.exitstatus == 130, out
    assert "interrupted: cancelling the migration" in out and "result:   cancelled, " in out, out
    assert "migration cancelled (interrupted); e2e runs on at side vm" in out, out
    after = labs.Lab.load(lab.name)
    assert (after.vm, after.procs, after.status()) == (before.vm, before.procs, "running")
    assert not any(p.alive() for p in destination)
    assert json.loads(run_lab("qmp", lab.name, "query-status", env=lab_env).stdout)["status"] == "running"


def use_console(lab_env: dict, name: str) -> None:
    """`lab console` in a terminal: a command typed there runs in the guest, Ctrl-] leaves and
    the guest runs on."""
    child = pexpect.spawn(sys.executable, ["-m", "lab", "console", name], env=lab_env, cwd=str(REPO),
                          encoding="utf-8", timeout=60)
    try:
        child.expect(f"connected to {name}'s console; Ctrl-] leaves")
        child.sendline("echo console-$((6 * 7))")
        child.expect("console-42")
        child.send("\x1d")
        child.expect(f"left {name}'s console")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
    assert json.loads(run_lab("qmp", name, "query-status", env=lab_env).stdout)["status"] == "running"


def processes_naming(path: Path) -> list[str]:
    """Command lines of the processes that mention `path`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in text:
            found.append(text)
    return found


FAILING = '''
from lab.guest import stamps

SEED = 0xBAD5EED

def test_wrong_serial(backend_factory, machine_factory):
    disk = backend_factory("ours", "vu0", size_mib=16, queues=1)
    vm = machine_factory(mem_mib=512, options=disk.options())
    assert vm.ssh.disk_by_serial(disk.serial) == "/dev/vdz", "the disk is not where this test expects it"
'''


def test_failure_report_and_repro(lab_env: dict, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "conftest.py").write_text(f"pytest_plugins = {list(PLUGINS)!r}\n")
    (project / "test_fails.py").write_text(FAILING)
    env = {**lab_env, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "pytest", "test_fails.py", "-p", "no:cacheprovider"], cwd=project,
                            env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 1, result.stdout
    report = result.stdout[result.stdout.index("lab failure report"):]
    manifest = Path(lab_env["LAB_ARTIFACTS"]) / "test_fails.py_test_wrong_serial" / "manifest.json"
    assert "test_wrong_serial failed in call: AssertionError: the disk is not where" in report
    assert f"lab repro {manifest}" in report
    assert "--- console of vm0, last lines:" in report and "--- back end vu0.ours.log, last lines:" in report
    assert result.stdout.count("lab failure report") == 1
    recorded = json.loads(manifest.read_text())
    assert recorded["seeds"] == {"SEED": 0xBAD5EED} and recorded["outcome"]["outcome"] == "failed"
    assert len(recorded["backends"]) == 1 and recorded["disks"][0]["size"] == 16 << 20

    repro = run_lab("repro", str(manifest), "--keep", "--name", "kept", env=env)
    assert "reproduced: it fails the same way" in repro.stdout
    rerun = re.search(r"re-run artifacts: (\S+)\)", repro.stdout)
    assert rerun, repro.stdout  # the failing re-run keeps its artifacts for a look
    shutil.rmtree(rerun.group(1))
    assert "lab kept is up" in repro.stdout
    assert run_lab("ssh", "kept", "cat", "/sys/block/vdb/serial", env=env).stdout.strip() == "lab-vu0"
    kept = labs.Lab.load("kept")
    run_lab("down", "kept", env=env)
    assert not any(p.alive() for p in kept.procs)
