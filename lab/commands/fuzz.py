"""`lab fuzz --seconds N [--seed S]`: fuzz our vhost-user back end as a hostile front end and a
hostile guest (lab.fuzz); `lab fuzz --replay FILE` runs a reproducer again."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from lab.errors import LabError
from lab.fuzz.runner import Campaign, FuzzFailure, Stats, replay


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("fuzz", help="fuzz our vhost-user back end (hostile front end and guest)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz after the seeds (default 60)")
    parser.add_argument("--seed", type=int, help="campaign seed (default: random, printed)")
    parser.add_argument("--replay", type=Path, metavar="FILE", help="run the case of a reproducer instead")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="where a finding's reproducer and back end log go (default ./artifacts/fuzz)")
    parser.set_defaults(func=run)


def _progress(stats: Stats) -> None:
    print(stats.line(), file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if args.seconds < 0:
        raise LabError(f"--seconds {args.seconds}: must not be negative")
    if args.replay is not None and not args.replay.is_file():
        raise LabError(f"reproducer {args.replay} does not exist")
    keep = (args.keep or Path("artifacts") / "fuzz").resolve()
    workdir = Path(tempfile.mkdtemp(prefix="lab-fuzz-"))  # short: the daemon's socket lives here
    try:
        if args.replay is not None:
            return _replay(workdir, args.replay)
        campaign = Campaign(workdir, args.seed, _progress)
        print(f"lab fuzz: seed {campaign.stats.seed}, {args.seconds:.0f}s", file=sys.stderr)
        try:
            stats = campaign.run(args.seconds)
        except FuzzFailure as failure:
            saved = keep / failure.reproducer.parent.name
            shutil.copytree(failure.reproducer.parent, saved, dirs_exist_ok=True)
            print(f"FINDING: {failure.finding}", file=sys.stderr)
            print(f"case: {failure.case}", file=sys.stderr)
            print(f"reproduce: lab fuzz --replay {saved / 'case.json'}   (campaign: lab fuzz --seed "
                  f"{campaign.stats.seed} --seconds {args.seconds:.0f})", file=sys.stderr)
            return 1
        print(f"no findings: {stats.cases} cases ({stats.seeds} seeds), {stats.verified_io} verified-I/O "
              f"connections in {stats.seconds:.0f}s, seed {stats.seed}")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _replay(workdir: Path, reproducer: Path) -> int:
    try:
        outcome = replay(workdir, reproducer)
    except FuzzFailure as failure:
        print(f"FINDING reproduced: {failure.finding}", file=sys.stderr)
        return 1
    except (ValueError, KeyError, TypeError) as exc:
        raise LabError(f"{reproducer} is not a lab fuzz reproducer: {exc}") from None
    print(f"case ran clean ({outcome}): the finding does not reproduce")
    return 0
