"""`lab bench KIND ...`: measurements. Each kind is a module lab/bench/<kind>.py with
`register(subparsers)`; adding a bench means adding its module and its name to BENCHES."""

from __future__ import annotations

import argparse
import importlib

BENCHES = ("boot", "backend", "guest_blk", "guest_scsi", "guest_driver", "migration")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="measure boot, back end, guest I/O, migration")
    kinds = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name in BENCHES:
        importlib.import_module(f"lab.bench.{name}").register(kinds)
