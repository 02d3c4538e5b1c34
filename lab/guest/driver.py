"""The userspace virtio driver inside a guest: a zipapp of lab/virtio pushed over SFTP and run.

`build_zipapp` packs lab/virtio (standard library only) as the package `labvirtio` with its
command line as entry point; `GuestDriver.install` copies it into the guest; list/info/io run
`python3 labvirtio.pyz ... --json` over SSH and return typed results (io: the engine's own
IoReport). A refusal or failure in the guest becomes DriverError carrying the driver's one line.
`start_io` leaves an `io --until-stopped` run going in the guest, detached from SSH (it survives
the connection, e.g. to the source of a live migration); the DetachedIo it returns follows,
stops and collects it through files over whichever connection reaches the guest now.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import tempfile
import time
import zipapp
from pathlib import Path
from typing import Any

from lab.errors import LabError, TimeoutExpired
from lab.guest.ssh import GuestSSH, Result
from lab.virtio.engine import IoCounters, IoReport

VIRTIO_SOURCES = Path(__file__).resolve().parents[1] / "virtio"
PACKAGE = "labvirtio"
ZIPAPP = f"{PACKAGE}.pyz"
GUEST_PATH = f"/root/{ZIPAPP}"
# 2 MiB hugepages reserved in the guest for the driver's DMA memory. At run time, not with
# hugepages=N on the kernel command line: boot-time pages come from the top of RAM, where SeaBIOS
# left the rings of the virtio-scsi devices it probed, and a vhost-user back end then finds those
# rings overwritten when the guest kernel resets the device (our scsi back end breaks on that).
HUGEPAGES = 64
RUN_DIR = "/tmp/labvirtio-run"  # a detached run's files: progress.jsonl, stop, report.json, stderr, status
START_SECONDS = 120.0  # a detached run takes the device and reports its first counters (TCG)
STOP_SECONDS = 120.0  # ... finishes its requests in flight, flushes and gives the device back
POLL_SECONDS = 0.3


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
            raise driver_error(args, result)
        return result

    def error(self, args: list[str], timeout: float = 120.0) -> str:
        """The one-line error of a command that must fail (LabError if it succeeds)."""
        result = self.run(args, timeout, check=False)
        if result.exit_status == 0:
            raise LabError(f"labvirtio {shlex.join(args)} succeeded; a refusal was expected:\n{result.stdout[-500:]}")
        return driver_error(args, result).message

    def list(self) -> list[PciEntry]:
        return [PciEntry(**row) for row in self._json(["list", "--json"])]

    def function_of(self, block_device: str) -> str:
        """The PCI address (BDF) of the function behind the kernel's `block_device` (/dev/vdb)."""
        name = block_device.removeprefix("/dev/")
        found = [entry.bdf for entry in self.list() if name in entry.block]
        if len(found) != 1:
            raise LabError(f"{len(found)} virtio functions carry {block_device}: {found}")
        return found[0]

    def info(self, bdf: str, timeout: float = 120.0) -> dict[str, Any]:
        return self._json(["info", bdf, "--json"], timeout)

    def io(self, bdf: str, timeout: float | None = None, **options: Any) -> IoReport:
        """`io BDF --json` with options as keywords (rw="randrw", qd=32, verify=True, ...).

        The report comes back even when the run found errors (exit status 1): callers assert."""
        args = io_args(bdf, options)
        seconds = float(options.get("seconds") or 0) * int(options.get("passes") or 1)
        return report_of(args, self.run(args, timeout or seconds + 180.0, check=False))

    def start_io(self, bdf: str, directory: str = RUN_DIR, timeout: float = START_SECONDS,
                 **options: Any) -> DetachedIo:
        """`io BDF` with `options` as for io(), running until stopped, detached from SSH; returns
        once it reports counters (DriverError if it fails before)."""
        if self.ssh.run(f"test -e {shlex.quote(directory)}", check=False).exit_status == 0:
            raise LabError(f"{directory} exists in the guest: a detached labvirtio run used it already")
        run = DetachedIo(io_args(bdf, options), directory)
        args = run.args + ["--until-stopped", run.path("stop"), "--progress", run.path("progress.jsonl")]
        # the exit status is written last: its file says that the report is complete
        inner = (f"python3 {shlex.quote(self.path)} {shlex.join(args)} > {run.file('report.tmp')} "
                 f"2> {run.file('stderr')}; echo $? > {run.file('status.tmp')}; "
                 f"mv {run.file('report.tmp')} {run.file('report.json')}; mv {run.file('status.tmp')} {run.file('status')}")
        self.ssh.run(f"mkdir -p {shlex.quote(directory)}")
        self.ssh.start_detached(inner)
        deadline = time.monotonic() + timeout
        while run.progress(self.ssh) is None:
            if time.monotonic() > deadline:
                raise TimeoutExpired(f"labvirtio {shlex.join(args[:2])} reported no progress after {timeout:.0f}s")
            time.sleep(POLL_SECONDS)
        return run

    def _json(self, args: list[str], timeout: float = 120.0) -> Any:
        result = self.run(args, timeout)
        try:
            return json.loads(result.stdout)
        except ValueError:
            raise LabError(f"labvirtio {shlex.join(args)} printed no JSON:\n{result.stdout[-500:]}") from None


@dataclasses.dataclass(frozen=True)
class DetachedIo:
    """An `io --until-stopped` run in the guest, known by its files in `directory`. Each method
    takes the SSH connection to use: after a migration, the destination's."""

    args: list[str]
    directory: str

    def path(self, name: str) -> str:
        return f"{self.directory}/{name}"

    def file(self, name: str) -> str:
        """path() for a shell command line."""
        return shlex.quote(self.path(name))

    def progress(self, ssh: GuestSSH) -> IoCounters | None:
        """The latest counters (None before the first); DriverError if the run has ended."""
        out = ssh.run(f"cat {self.file('status')} 2>/dev/null; echo; tail -n 2 {self.file('progress.jsonl')} 2>/dev/null",
                      check=False).stdout
        status, _, tail = out.partition("\n")
        if status.strip():
            raise driver_error(self.args, self._result(ssh, int(status)))
        lines = [line for line in tail.splitlines(keepends=True) if line.endswith("\n")]  # not one being written
        return IoCounters(**json.loads(lines[-1])) if lines else None

    def wait_for_more(self, ssh: GuestSSH, ios: int, timeout: float) -> IoCounters:
        """The counters once `ios` more requests completed: the run and its device work (on the
        guest's current side); TimeoutExpired if not within `timeout`."""
        start = self.progress(ssh)
        done = start.ios if start else 0
        deadline = time.monotonic() + timeout
        while True:
            now = self.progress(ssh)
            if now is not None and now.ios >= done + ios:
                return now
            if time.monotonic() > deadline:
                raise TimeoutExpired(f"guest driver I/O stalled: {now} (wanted {ios} more requests in {timeout:.0f}s)")
            time.sleep(POLL_SECONDS)

    def stop(self, ssh: GuestSSH, timeout: float = STOP_SECONDS) -> IoReport:
        """Tell the run to finish; its report (even one with errors: callers assert), or
        DriverError if it failed without one."""
        ssh.run(f"touch {self.file('stop')}")
        deadline = time.monotonic() + timeout
        while (status := ssh.run(f"cat {self.file('status')}", check=False)).exit_status != 0:
            if time.monotonic() > deadline:
                raise TimeoutExpired(f"labvirtio {shlex.join(self.args[:2])} still running {timeout:.0f}s after the stop")
            time.sleep(POLL_SECONDS)
        return report_of(self.args, self._result(ssh, int(status.stdout)))

    def _result(self, ssh: GuestSSH, status: int) -> Result:
        """The ended run as if it had run in the foreground."""
        def read(name: str) -> str:
            return ssh.run(f"cat {self.file(name)}", check=False).stdout

        return Result(shlex.join(self.args), status, read("report.json"), read("stderr"))


def io_args(bdf: str, options: dict[str, Any]) -> list[str]:
    """`io BDF --json` and the options as flags (flag=True: present, False or None: absent)."""
    args = ["io", bdf, "--json"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value not in (False, None):
            args += [flag, str(value)]
    return args


def report_of(args: list[str], result: Result) -> IoReport:
    try:
        return IoReport.from_json(json.loads(result.stdout))
    except (ValueError, TypeError, KeyError):
        raise driver_error(args, result) from None


def driver_error(args: list[str], result: Result) -> DriverError:
    lines = (result.stderr.strip() or result.stdout.strip() or f"exit status {result.exit_status}").splitlines()
    return DriverError(shlex.join(args[:2]), lines[-1].removeprefix("labvirtio: error: "), result)
