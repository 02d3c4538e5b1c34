"""Run fio in the guest from job descriptions and return its parsed JSON results."""

from __future__ import annotations

import dataclasses
import errno
import json
import shlex
from collections.abc import Mapping
from typing import Any

from lab.errors import LabError
from lab.guest.ssh import GuestSSH

Job = Mapping[str, Any] | Any  # a mapping of fio options, or a dataclass whose fields are options


@dataclasses.dataclass(frozen=True)
class JobResult:
    name: str
    read_iops: float
    read_bw_kib: int  # KiB/s, as fio reports it
    write_iops: float
    write_bw_kib: int
    error: int  # errno of the first error, 0 when none
    verify_failed: bool  # fio reports data mismatches as EILSEQ

    @classmethod
    def from_fio(cls, job: Mapping[str, Any]) -> JobResult:
        err = int(job.get("error", 0))
        return cls(
            name=job["jobname"],
            read_iops=float(job["read"]["iops"]),
            read_bw_kib=int(job["read"]["bw"]),
            write_iops=float(job["write"]["iops"]),
            write_bw_kib=int(job["write"]["bw"]),
            error=err,
            verify_failed=err == errno.EILSEQ,
        )


@dataclasses.dataclass(frozen=True)
class FioReport:
    jobs: list[JobResult]
    raw: dict  # fio's whole JSON document, for artifacts and ad hoc checks

    def job(self, name: str) -> JobResult:
        for result in self.jobs:
            if result.name == name:
                return result
        raise KeyError(name)


class FioFailed(LabError):
    def __init__(self, message: str, report: FioReport | None, stderr: str) -> None:
        super().__init__(message)
        self.report = report
        self.stderr = stderr


def option_args(options: Job) -> list[str]:
    """`--key=value ...`; True is a bare flag, False/None leave the key out."""
    if dataclasses.is_dataclass(options):
        options = dataclasses.asdict(options)
    args = []
    for key, value in options.items():
        if value is True:
            args.append(f"--{key}")
        elif value not in (False, None):
            args.append(f"--{key}={value}")
    return args


def command(jobs: Mapping[str, Job], global_options: Job | None = None) -> str:
    """The fio command line: global options first, then each job as `--name=NAME` + options."""
    args = ["fio", "--output-format=json", *option_args(global_options or {})]
    for name, options in jobs.items():
        args += [f"--name={name}", *option_args(options)]
    return shlex.join(args)


def run(
    guest: GuestSSH,
    jobs: Mapping[str, Job],
    global_options: Job | None = None,
    timeout: float = 300.0,
) -> FioReport:
    """Run the jobs (name -> fio options) in one fio process; raise FioFailed on any error."""
    result = guest.run(command(jobs, global_options), timeout=timeout, check=False)
    report = _parse(result.stdout)
    failed = [j for j in report.jobs if j.error] if report else []
    if result.exit_status != 0 or report is None or failed:
        what = (
            ", ".join(
                f"{j.name}: errno {j.error}" + (" (verify)" if j.verify_failed else "")
                for j in failed
            )
            or f"exit status {result.exit_status}"
        )
        detail = result.stderr.strip().splitlines()[-5:]
        raise FioFailed(f"fio failed ({what}): {' | '.join(detail)}", report, result.stderr)
    return report


def _parse(stdout: str) -> FioReport | None:
    # fio may print notices before the JSON document on stdout.
    start = stdout.find("{")
    if start < 0:
        return None
    try:
        doc = json.loads(stdout[start:])
        return FioReport([JobResult.from_fio(j) for j in doc["jobs"]], doc)
    except (ValueError, KeyError, TypeError):
        return None
