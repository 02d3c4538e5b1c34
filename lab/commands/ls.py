"""`lab ls`: the labs and their state (running, starting, degraded, failed, stale)."""

from __future__ import annotations

import argparse
import time

from lab import labs


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ls",
        help="list labs and their state",
        description="List the labs started by `lab up` / `lab repro --keep`: running (every process alive), "
        "starting, degraded (some process gone, e.g. a crashed back end), failed (did not come up) or stale "
        "(all processes gone). `lab down NAME` or `lab down --all` cleans them up.",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    found = labs.all_labs()
    if not found:
        print(f"no labs (state directory {labs.state_root()})")
        return 0
    rows = [("NAME", "STATE", "BACKEND", "SSH", "AGE", "PROCESSES")]
    for lab in found:
        if isinstance(lab, Exception):
            rows.append(("?", "damaged", "", "", "", str(lab)))
            continue
        procs = " ".join(f"{p.role}:{p.pid}{'' if p.alive() else '(gone)'}" for p in lab.procs)
        port = str(lab.ssh_port) if lab.ssh_port else "-"
        rows.append((lab.name, lab.status(), lab.backend, port, _age(time.time() - lab.created), procs or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"
