"""Choose the accelerator: KVM when it really boots a kernel, TCG otherwise.

`/dev/kvm` existing proves nothing (a nested PVM host hangs guests), so `auto` boots the guest
kernel under KVM and waits briefly for its first console line. The verdict is cached per host
boot and QEMU binary under $LAB_CACHE, so the probe is paid once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from lab.errors import LabError
from lab.qemu import process

ENV = "LAB_ACCEL"
CHOICES = ("auto", "kvm", "tcg")
PROBE_SECONDS = 6.0
_PROBE_MARK = b"Linux version"


@dataclasses.dataclass(frozen=True)
class Accel:
    name: str
    argv: tuple[str, ...]
    timeout_scale: float  # multiply base (KVM-sized) timeouts by this

    def scaled(self, seconds: float) -> float:
        # pytest-xdist workers boot their guests at once on the same CPUs
        workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
        return seconds * self.timeout_scale * workers


# -cpu host on KVM: same-host migration keeps working and guests see real features.
KVM = Accel("kvm", ("-accel", "kvm", "-cpu", "host"), 1.0)
TCG = Accel("tcg", ("-accel", "tcg,thread=multi"), 4.0)
_BY_NAME = {a.name: a for a in (KVM, TCG)}


def by_name(name: str) -> Accel:
    """The accelerator called `name` (a recorded run's, for `lab repro`)."""
    if name not in _BY_NAME:
        raise LabError(f"unknown accelerator {name!r} (known: {', '.join(_BY_NAME)})")
    return _BY_NAME[name]


def cache_dir() -> Path:
    return Path(os.environ.get("LAB_CACHE") or Path.home() / ".cache" / "qemu-lab")


def requested() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise LabError(f"{ENV}={value!r} is not one of {', '.join(CHOICES)}")
    return value


def choose(kernel: Path, qemu: str = "qemu-system-x86_64") -> Accel:
    """The accelerator for this host: $LAB_ACCEL, or the cached/probed verdict for `auto`."""
    value = requested()
    if value != "auto":
        return _BY_NAME[value]
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return TCG
    return _BY_NAME[_cached_verdict(qemu, kernel)]


def timeout_scale(kernel: Path, qemu: str = "qemu-system-x86_64") -> float:
    return choose(kernel, qemu).timeout_scale


def _probe_key(qemu: str) -> str:
    binary = shutil.which(qemu)
    if binary is None:
        raise LabError(f"QEMU binary not found: {qemu}")
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    st = os.stat(binary)
    return f"{boot_id}:{os.path.realpath(binary)}:{st.st_size}:{int(st.st_mtime)}"


def _cached_verdict(qemu: str, kernel: Path) -> str:
    key = _probe_key(qemu)
    path = cache_dir() / "accel-probe.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # The lock makes parallel workers wait for one probe instead of each running their own.
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            verdicts = json.loads(path.read_text())
        except (OSError, ValueError):
            verdicts = {}
        if key not in verdicts:
            # Only the current host boot's verdict is worth keeping.
            verdicts = {key: "kvm" if kvm_boots(qemu, kernel) else "tcg"}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(verdicts))
            tmp.replace(path)
        return verdicts[key]


def kvm_boots(qemu: str, kernel: Path, seconds: float = PROBE_SECONDS) -> bool:
    """Boot `kernel` under KVM; True once it prints its banner on the serial port in time."""
    if not Path(kernel).is_file():
        raise LabError(f"kernel for the KVM probe not found: {kernel}")
    with tempfile.TemporaryDirectory(prefix="lab-kvm-probe-") as tmp:
        serial = Path(tmp) / "serial.log"
        serial.touch()
        argv = [qemu, *KVM.argv, "-M", "q35", "-m", "256", "-display", "none", "-nodefaults"]
        argv += [
            "-no-user-config",
            "-no-reboot",
            "-kernel",
            str(kernel),
            "-serial",
            f"file:{serial}",
        ]
        argv += ["-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1"]
        proc = process.spawn(argv)
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and proc.poll() is None:
                if _PROBE_MARK in serial.read_bytes():
                    return True
                time.sleep(0.05)
            return _PROBE_MARK in serial.read_bytes()
        finally:
            process.stop_group(proc, term_grace=1.0)
