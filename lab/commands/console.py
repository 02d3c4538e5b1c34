"""`lab console NAME`: the guest's serial console in this terminal (Ctrl-] leaves)."""

from __future__ import annotations

import argparse
import os
import select
import sys
import termios
import tty

from lab import labs
from lab.qemu.console import Console

ESCAPE = b"\x1d"  # Ctrl-]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "console",
        help="attach this terminal to a lab's serial console",
        description="Attach to the lab's serial console (root shell on ttyS0). One client at a time; Ctrl-] "
        "detaches and leaves the guest running. The whole console output is also in console.log in the directory "
        "of the lab's current side (vm, then vm1, ... after each `lab migrate`).",
    )
    parser.add_argument("name", help="the lab")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    lab = labs.Lab.load(args.name).require_running()
    with Console(lab.console_socket) as console:
        print(f"connected to {lab.name}'s console; Ctrl-] leaves", flush=True)
        console.sendline()  # a fresh prompt
        interact(console.fileno())
    print(f"\nleft {lab.name}'s console")
    return 0


def interact(fd: int) -> None:
    """Copy between the terminal and `fd` until Ctrl-] or the console closes."""
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    if saved is not None:
        tty.setraw(stdin)
    try:
        while True:
            ready, _, _ = select.select([stdin, fd], [], [])
            if fd in ready:
                data = os.read(fd, 4096)
                if not data:
                    return
                os.write(sys.stdout.fileno(), data)
            if stdin in ready:
                data = os.read(stdin, 1024)
                if not data or ESCAPE in data:
                    return
                os.write(fd, data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
