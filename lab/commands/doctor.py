"""`lab doctor [--fix]`: check (and with --fix, install) what the host needs.

Silent, exit 0, when everything is there.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from lab import host
from lab.errors import LabError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("doctor", help="check the host for required tools")
    parser.add_argument(
        "--fix", action="store_true", help="install missing packages with apt (root)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    missing = host.check_host()
    if not missing:
        return 0
    command = shlex.join(host.install_command(missing))
    if not args.fix:
        print(f"missing packages: {' '.join(missing)}", file=sys.stderr)
        print(
            f"fix: lab doctor --fix (as root), or: apt-get update && {command}",
            file=sys.stderr,
        )
        return 1
    if os.geteuid() != 0:
        print(
            f"--fix needs root; run: sudo sh -c 'apt-get update && {command}'",
            file=sys.stderr,
        )
        return 1
    host.install(missing)
    still = host.check_host()
    if still:
        raise LabError(f"still missing after install: {' '.join(still)}")
    return 0
