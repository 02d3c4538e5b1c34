"""`lab down NAME|--all`: stop everything a lab started and remove its state."""

from __future__ import annotations

import argparse
import shutil

from lab import labs
from lab.errors import LabError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "down",
        help="stop a lab (or all) and remove its state",
        description="Stop the guest (QMP quit, then SIGTERM, then SIGKILL of its process group) and its back end, "
        "then remove the lab's directory (disk image, logs, trace, manifest). Stale labs, whose processes are "
        "already gone, are just removed.",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("name", nargs="?", help="the lab to stop")
    target.add_argument("--all", action="store_true", help="every lab")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.all:
        names = labs.lab_names()
        if not names:
            print("no labs")
            return 0
    else:
        names = [labs.check_name(args.name)]
    failed = 0
    for name in names:
        try:
            lab = labs.Lab.load(name)
        except LabError as exc:
            if not args.all or "damaged" not in str(exc):
                raise
            shutil.rmtree(labs.state_root() / name, ignore_errors=True)  # unreadable state: nothing to stop
            print(f"{name}: damaged state removed")
            continue
        state = lab.status()
        try:
            stopped = lab.remove()
        except LabError as exc:
            print(f"{name}: {exc}")
            failed += 1
            continue
        print(f"{name}: was {state}; " + (f"stopped {', '.join(stopped)}; " if stopped else "") + "state removed")
    return 1 if failed else 0
