"""The userspace virtio driver inside a guest: a zipapp of lab/virtio pushed over SFTP and run.

`build_zipapp` packs lab/virtio (standard library only) as the package `labvirtio` with its
command line as entry point; `GuestDriver.install` copies it into the guest; list/info/io run
`python3 labvirtio.pyz ... --json` over SSH and return typed results (io: the engine's own
IoReport). A refusal or failure in the guest becomes DriverError carrying the driver's one line.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import tempfile
import zipapp
from pathlib import Path
from typing import Any

from lab.errors import LabError
from lab.guest.ssh import GuestSSH, Result
from lab.virtio.engine import IoReport

VIRTIO_SOURCES = Path(__file__).resolve().parents[1] / "virtio"
PACKAGE = "labvirtio"
ZIPAPP = f"{PACKAGE}.pyz"
GUEST_PATH = f"/root/{ZIPAPP}"
# 2 MiB hugepages reserved in the guest for the driver's DMA memory. At run time, not with
# hugepages=N on the kernel command line: boot-time pages come from the top of RAM, where SeaBIOS
# left the rings of the virtio-scsi devices it probed, and a vhost-user back end then finds those
# rings overwritten when the guest kernel resets the device (our scsi back end breaks on that).
HUGEPAGES = 64


class DriverError(LabError):
    """The driver in the guest refused or failed; `message` is its one-line error."""

    def __init__(self, command: str, message: str, result: Result) -> None:
        super().__init__(f"labvirtio {command}: {message}")
        self.message = message
        self.result = result


@dataclasses.dataclass(frozen=True)
class PciEntry:
    bdf: str
    id: str
    kind: str
    transitional: bool
    driver: str | None
    block: list[str]


def build_zipapp(directory: Path) -> Path:
    """labvirtio.pyz in `directory`, built from the current lab/virtio sources."""
    target = Path(directory) / ZIPAPP
    with tempfile.TemporaryDirectory(prefix="labvirtio-") as staging:
        package = Path(staging) / PACKAGE
        package.mkdir()
        for source in sorted(VIRTIO_SOURCES.glob("*.py")):
            shutil.copy(source, package / source.name)
        # zipapp's own main= wrapper drops main()'s return value: the exit status must carry it
        (Path(staging) / "__main__.py").write_text(f"import sys\nfrom {PACKAGE}.cli import main\nsys.exit(main())\n")
        zipapp.create_archive(staging, target, interpreter="/usr/bin/python3")
    return target


class GuestDriver:
    """Runs the zipapp in one guest."""

    def __init__(self, ssh: GuestSSH, path: str = GUEST_PATH) -> None:
        self.ssh = ssh
        self.path = path

    @classmethod
    def install(cls, ssh: GuestSSH, zipapp_path: Path, path: str = GUEST_PATH, hugepages: int = HUGEPAGES) -> GuestDriver:
        """Copy the zipapp in and make sure `hugepages` 2 MiB pages are free for it."""
        ssh.put(zipapp_path, path)
        free = ssh.run(
            f"echo {hugepages} > /proc/sys/vm/nr_hugepages; cat /sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages"
        ).stdout.strip()
        if int(free) < hugepages:
            raise LabError(f"the guest reserved only {free} of {hugepages} hugepages for the driver")
        return cls(ssh, path)

    def run(self, args: list[str], timeout: float = 120.0, check: bool = True) -> Result:
        """The driver's command line as given; DriverError on a non-zero exit when `check`."""
        result = self.ssh.run(f"python3 {self.path} {shlex.join(args)}", timeout=timeout, check=False)
        if check and result.exit_status != 0:
            raise self._error(args, result)
        return result

    def error(self, args: list[str], timeout: float = 120.0) -> str:
        """The one-line error of a command that must fail (LabError if it succeeds)."""
        result = self.run(args, timeout, check=False)
        if result.exit_status == 0:
            raise LabError(f"labvirtio {shlex.join(args)} succeeded; a refusal was expected:\n{result.stdout[-500:]}")
        return self._error(args, result).message

    def list(self) -> list[PciEntry]:
        return [PciEntry(**row) for row in self._json(["list", "--json"])]

    def info(self, bdf: str, timeout: float = 120.0) -> dict[str, Any]:
        return self._json(["info", bdf, "--json"], timeout)

    def io(self, bdf: str, timeout: float | None = None, **options: Any) -> IoReport:
        """`io BDF --json` with options as keywords (rw="randrw", qd=32, verify=True, ...).

        The report comes back even when the run found errors (exit status 1): callers assert."""
        args = ["io", bdf, "--json"]
        for key, value in options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value not in (False, None):
                args += [flag, str(value)]
        seconds = float(options.get("seconds") or 0) * int(options.get("passes") or 1)
        result = self.run(args, timeout or seconds + 180.0, check=False)
        try:
            return IoReport.from_json(json.loads(result.stdout))
        except (ValueError, TypeError, KeyError):
            raise self._error(args, result) from None

    def _json(self, args: list[str], timeout: float = 120.0) -> Any:
        result = self.run(args, timeout)
        try:
            return json.loads(result.stdout)
        except ValueError:
            raise LabError(f"labvirtio {shlex.join(args)} printed no JSON:\n{result.stdout[-500:]}") from None

    @staticmethod
    def _error(args: list[str], result: Result) -> DriverError:
        lines = (result.stderr.strip() or result.stdout.strip() or f"exit status {result.exit_status}").splitlines()
        return DriverError(shlex.join(args[:2]), lines[-1].removeprefix("labvirtio: error: "), result)
