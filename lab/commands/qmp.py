"""`lab qmp NAME COMMAND [JSON-ARGS]`: one QMP command to a lab's QEMU, the answer as JSON."""

from __future__ import annotations

import argparse
import json

from lab import labs
from lab.errors import LabError
from lab.qemu.qmp import QMP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "qmp",
        help="send one QMP command to a lab's QEMU",
        description="Execute one QMP command on the lab's QEMU and print its return value as JSON; QEMU's error "
        "class and description otherwise. Example: lab qmp lab1 query-block; "
        "lab qmp lab1 human-monitor-command '{\"command-line\": \"info mtree\"}'. "
        "Every exchange is appended to the lab's vm/qmp.jsonl.",
    )
    parser.add_argument("name", help="the lab")
    parser.add_argument("command", help="QMP command, e.g. query-status")
    parser.add_argument("arguments", nargs="?", default="{}", help="its arguments as a JSON object (default {})")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        arguments = json.loads(args.arguments)
    except ValueError as exc:
        raise LabError(f"arguments {args.arguments!r} are not JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise LabError(f"arguments must be a JSON object, not {type(arguments).__name__}")
    lab = labs.Lab.load(args.name).require_running()
    qmp = QMP(lab.qmp_socket, lab.vm_dir / "qmp.jsonl")
    try:
        qmp.connect(10.0)
        result = qmp.cmd(args.command, **arguments)
    finally:
        qmp.close()
    print(json.dumps(result, indent=2))
    return 0
