"""The lab's command line: `lab SUBCOMMAND ...` (also `python -m lab`).

Each subcommand lives in lab/commands/<name>.py and exposes `register(subparsers)`, which adds
its parser and sets `func` to a callable taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lab.errors import LabError

COMMANDS = ("doctor", "image", "bench", "backend", "demo", "up", "ls", "ssh", "console", "qmp", "io", "migrate", "down", "repro", "trace", "fuzz")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lab", description="QEMU virtio storage lab: guests, back ends, drivers, migration."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"lab.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except LabError as exc:
        print(f"lab: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lab: interrupted", file=sys.stderr)
        return 130
