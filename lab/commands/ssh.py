"""`lab ssh NAME [COMMAND...]`: a shell (or one command) in a lab's guest, as root."""

from __future__ import annotations

import argparse
import os
import shutil

from lab import labs
from lab.errors import LabError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ssh",
        help="log in to a lab's guest, or run one command there",
        description="Run OpenSSH's ssh as root into the lab's guest (user-mode network port forward, the image's "
        "key). Without COMMAND: an interactive shell. The exit status is the command's.",
    )
    parser.add_argument("name", help="the lab")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="command to run in the guest (default: a shell)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    lab = labs.Lab.load(args.name).require_running()
    if shutil.which("ssh") is None:
        raise LabError("ssh is not installed (apt-get install openssh-client)")
    argv = lab.ssh_argv(args.command)
    os.execvp(argv[0], argv)  # the terminal belongs to ssh from here on
    return 0
