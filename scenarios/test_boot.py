"""A guest boots and everything the lab reaches it through works; teardown leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from images import READY_MARKER, ImageInfo
from lab.guest import fio
from lab.qemu import process
from lab.qemu.machine import create_raw_image, virtio_blk_disk

pytestmark = pytest.mark.boot

REPO = Path(__file__).resolve().parents[1]
SCRATCH_SERIAL = "scratch"
CORRUPT_OFFSET = 1 << 20


def stamped_job(disk: str, **extra: object) -> dict[str, object]:
    """Every 4 KiB block carries a crc32c header (with its offset) over a fixed pattern."""
    return {
        "filename": disk,
        "rw": "write",
        "bs": "4k",
        "size": "8M",
        "direct": 1,
        "ioengine": "libaio",
        "iodepth": 8,
        "verify": "crc32c",
        "verify_pattern": "0x4c414221",
        "verify_fatal": 1,
        **extra,
    }


def test_guest_boots_serves_io_and_tears_down(machine_factory, test_dir: Path) -> None:
    scratch = create_raw_image(test_dir / "scratch.raw", 32)
    vm = machine_factory(options=virtio_blk_disk("scratch", scratch, SCRATCH_SERIAL))

    assert vm.ssh.run("uname -r").stdout.strip() == vm.config.image.kernel_version
    assert READY_MARKER in vm.console_log.read_text(errors="replace")
    assert vm.qmp.cmd("query-status")["status"] == "running"
    with vm.console() as console:
        vm.ssh.run("echo console-ping-$((6*7)) >/dev/ttyS0")
        console.expect("console-ping-42", timeout=vm.scaled(5))

    disk = vm.ssh.disk_by_serial(SCRATCH_SERIAL)
    report = fio.run(vm.ssh, {"stamp": stamped_job(disk)})
    assert report.job("stamp").write_iops > 0

    # The check must be able to fail: damage one block behind the guest's back, re-verify.
    with open(scratch, "r+b") as f:
        f.seek(CORRUPT_OFFSET)
        f.write(b"\xff" * 4096)
    with pytest.raises(fio.FioFailed) as failed:
        fio.run(vm.ssh, {"check": stamped_job(disk, verify_only=1)})
    assert failed.value.report is not None and failed.value.report.job("check").verify_failed

    pid = vm.pid
    vm.shutdown()
    assert vm.returncode == 0, "QMP quit should end QEMU cleanly"
    assert not process.group_alive(pid)
    assert not Path(f"/proc/{pid}").exists()


INNER_TESTS = """
def test_boot_forever(machine_factory):
    machine_factory("vm0")


def test_fail_after_launch(machine_factory):
    machine_factory("vm0", ready=False)
    assert False, "deliberate failure"
"""


def run_inner(test_dir: Path, name: str) -> tuple[subprocess.Popen, Path]:
    """A nested pytest session on INNER_TESTS::name with its own temp and artifact dirs."""
    inner = test_dir / "i"  # short: the inner session's socket paths nest below it
    inner.mkdir(exist_ok=True)
    (inner / "test_inner.py").write_text(textwrap.dedent(INNER_TESTS))
    (test_dir / "t").mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "TMPDIR": str(test_dir / "t"),
        "LAB_ARTIFACTS": str(inner / "artifacts"),
    }
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-c",
        os.devnull,
        "--rootdir",
        str(inner),
        "-p",
        "fixtures.artifacts",
        "-p",
        "fixtures.report",
        "-p",
        "fixtures.image",
        "-p",
        "fixtures.machine",
        f"test_inner.py::{name}",
    ]
    out = open(test_dir / f"{name}.out", "w")
    proc = subprocess.Popen(
        argv, cwd=inner, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    return proc, inner


def qemu_pids_under(path: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmdline and str(path).encode() in cmdline:
                found.append(int(entry.name))
    return found


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not within {timeout}s")


def test_ctrl_c_during_boot_leaves_no_qemu(lab_image: ImageInfo, test_dir: Path) -> None:
    proc, inner = run_inner(test_dir, "test_boot_forever")
    try:
        pids = wait_for(lambda: qemu_pids_under(test_dir), 60, "inner QEMU start")
        time.sleep(1.0)  # well inside the boot: SSH is seconds away
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == pytest.ExitCode.INTERRUPTED
    finally:
        process.stop_group(proc)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"QEMU {pid} survived the interrupt"
    assert not qemu_pids_under(test_dir)
    kept = list((inner / "artifacts").glob("*/vm0/console.log"))
    assert kept, "the interrupted test's directory should be kept as artifacts"


def test_failure_keeps_artifacts_and_reports_them(lab_image: ImageInfo, test_dir: Path) -> None:
    proc, inner = run_inner(test_dir, "test_fail_after_launch")
    try:
        assert proc.wait(timeout=120) == pytest.ExitCode.TESTS_FAILED
    finally:
        process.stop_group(proc)
    output = (test_dir / "test_fail_after_launch.out").read_text()
    (kept,) = (inner / "artifacts").iterdir()
    # one block per failure (fixtures.report): where the artifacts are and how to replay them
    assert "lab failure report" in output and f"artifacts: {kept}" in output
    assert f"lab repro {kept}/manifest.json" in output
    for name in ("console.log", "qemu.log", "qmp.jsonl", "qemu.cmdline"):
        assert (kept / "vm0" / name).is_file(), name
    assert "quit" in (kept / "vm0" / "qmp.jsonl").read_text()
    assert not qemu_pids_under(test_dir)
