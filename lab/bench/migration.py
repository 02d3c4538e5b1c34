"""`lab bench migration`: the same guest and workload migrated three ways, in one run.

Precopy with our back end, precopy with qemu-storage-daemon, postcopy with ours: each run boots
a guest on a fresh image, starts the live I/O agent, migrates once (bandwidth limited for the
first passes, then lifted or switched to postcopy) and verifies every buffer and block. Reports
total time, downtime, RAM transferred, passes and, for postcopy, pages requested and back end
faults; the target is precopy total time with ours at most 1.2x that with QSD.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from images.builder import ensure_image
from lab.bench import emit, progress
from lab.errors import LabError
from lab.guest.liveio import LiveIO
from lab.migration_job import POSTCOPY, PRECOPY, JobConfig, MigrationJob, read_heavy
from lab.qemu.machine import create_raw_image

DISK_MIB = 64
SEED = 0xBE4C
RUNS = (("precopy-ours", "ours", False), ("precopy-qsd", "qsd", False), ("postcopy-ours", "ours", True))
TARGET_RATIO = 1.2


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("migration", help="migration times: precopy ours vs QSD, postcopy ours")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="where the runs' timelines (PNG + JSON) are kept (default: a new "
                             "lab-bench-migration-DATE-TIME directory here)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = args.out or Path(f"lab-bench-migration-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LabError(f"--out {out}: {exc.strerror}") from None
    image = ensure_image(progress=progress)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="lab-bench-migration-") as tmp:  # disks, logs: gone after
        for name, kind, postcopy in RUNS:
            rows[name] = measure(image, Path(tmp) / name, kind, postcopy, out / name)
            progress(f"bench migration: {name}: {rows[name]['summary']}")
    ours, qsd = rows["precopy-ours"]["total_ms"], rows["precopy-qsd"]["total_ms"]
    ratio = round(ours / qsd, 3) if ours and qsd else None
    result = {"bench": "migration", "runs": rows, "precopy_ratio_ours_to_qsd": ratio,
              "target_ratio": TARGET_RATIO, "target_met": ratio is not None and ratio <= TARGET_RATIO}
    lines = [f"{name:14} {row['summary']}" + ("" if row["ok"] else f"  FAILED: {row['problems'][:2]}")
             for name, row in rows.items()]
    lines.append(f"precopy total time ours/qsd = {ratio} (target <= {TARGET_RATIO})")
    lines.append(f"timelines (PNG + JSON): {out.resolve()}")
    emit(result, args.json, lines)
    return 0 if all(row["ok"] for row in rows.values()) else 1


def measure(image, workdir: Path, kind: str, postcopy: bool, timeline: Path) -> dict:
    """One run in `workdir`; its timeline kept as `timeline`.png and .json."""
    workdir.mkdir(parents=True)
    disk = create_raw_image(workdir / "disk.img", DISK_MIB)
    job = MigrationJob(JobConfig(image, workdir, disk, kind=kind, trace=False))
    try:
        job.boot()
        liveio = LiveIO(read_heavy(SEED))
        liveio.start(job.ssh, job.device())
        liveio.wait_for_more(job.ssh, 200, job.current.machine.scaled(60))
        hop = job.hop(POSTCOPY if postcopy else PRECOPY, liveio, f"bench {kind}")
        result = hop.result
        if result.status == "completed" and not result.problems:
            report = liveio.stop(job.ssh)
            result.add_problems(report.problems())
            result.add_problems([str(m) for m in liveio.verify_image(disk, report)[:3]])
    except LabError as exc:
        return {"ok": False, "problems": [str(exc)], "summary": f"failed: {exc}".splitlines()[0], "total_ms": None}
    finally:
        job.close()
    for kept in (hop.timeline_png, hop.timeline_json):
        shutil.copyfile(kept, timeline.with_suffix(kept.suffix))
    return {**{k: v for k, v in result.to_json().items() if k != "marks"}, "summary": result.summary(),
            "timeline": str(timeline.with_suffix(".png").resolve())}
