"""The guest serial console: an interactive pexpect session on QEMU's console socket.

A chardev socket server takes ONE client, so readiness watches the chardev's logfile instead
(`wait_for_line`), and `Console` attaches only when a caller wants to type at the guest.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pexpect
from pexpect import fdpexpect

from lab.errors import LabError, TimeoutExpired


def tail(log: Path, lines: int = 15) -> str:
    """The last lines of a log, for error messages."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def wait_for_line(
    log: Path, needle: str, timeout: float, alive: Callable[[], bool] = lambda: True
) -> float:
    """Poll `log` until it contains `needle`; return the seconds waited.

    Gives up early when `alive()` turns false (QEMU exited): no point waiting for a dead guest.
    """
    start = time.monotonic()
    needle_b = needle.encode()
    offset = 0
    while True:
        try:
            with open(log, "rb") as f:
                f.seek(max(0, offset - len(needle_b)))
                chunk = f.read()
                if needle_b in chunk:
                    return time.monotonic() - start
                offset = f.tell()
        except FileNotFoundError:
            pass
        waited = time.monotonic() - start
        if not alive():
            raise LabError(f"QEMU exited before {needle!r} appeared; console:\n{tail(log)}")
        if waited >= timeout:
            raise TimeoutExpired(
                f"{needle!r} not on the console after {timeout:.0f}s; "
                f"last console lines:\n{tail(log)}"
            )
        time.sleep(0.05)


class Console:
    """Attach to the console socket; `expect` and `sendline` like a terminal user."""

    def __init__(self, socket_path: Path, timeout: float = 30.0) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(socket_path))
        except OSError as exc:
            sock.close()
            raise LabError(f"cannot attach to console {socket_path}: {exc}") from None
        # pexpect owns the descriptor from here on and closes it exactly once.
        self._child = fdpexpect.fdspawn(
            sock.detach(), timeout=timeout, encoding="utf-8", codec_errors="replace"
        )

    def expect(self, pattern: str | list[str], timeout: float) -> int:
        """Index of the pattern matched; TimeoutExpired with what was seen otherwise."""
        try:
            return self._child.expect(pattern, timeout=timeout)
        except pexpect.TIMEOUT:
            seen = (self._child.before or "")[-500:]
            raise TimeoutExpired(
                f"console: {pattern!r} not seen in {timeout:.0f}s; last output:\n{seen}"
            ) from None
        except pexpect.EOF:
            raise LabError("console closed (QEMU exited?)") from None

    @property
    def before(self) -> str:
        return self._child.before or ""

    def sendline(self, line: str = "") -> None:
        self._child.sendline(line)

    def fileno(self) -> int:
        """The console socket, for a terminal bridged to it (`lab console`)."""
        return self._child.child_fd

    def close(self) -> None:
        self._child.close()

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
