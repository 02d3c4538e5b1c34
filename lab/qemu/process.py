"""Child processes that cannot outlive the lab: own process group, parent-death signal, reaping.

Every process the lab starts goes through `spawn`, so one teardown (`stop_group`) fits all.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from pathlib import Path
from typing import IO

from lab.errors import LabError

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. SIGKILL on parent death covers the one case no
    # finally block can: the lab itself being SIGKILLed. The signal follows the parent *thread*,
    # so spawn from a thread that lives as long as the child (the main thread in practice).
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(
    argv: list[str], log: Path | None = None, cwd: Path | None = None, detached: bool = False
) -> subprocess.Popen:
    """Start argv in its own session (so terminal Ctrl-C reaches only us, and we decide).

    `detached`: no parent-death signal, so the process outlives this one (`lab up` guests);
    whoever detaches it must record its pid and stop it later (lab.labs)."""
    out: IO[bytes] | int = subprocess.DEVNULL
    log_file = open(log, "ab") if log is not None else None
    if log_file is not None:
        out = log_file
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=None if detached else _die_with_parent,
        )
    except FileNotFoundError:
        raise LabError(f"program not found: {argv[0]} (is it installed and on PATH?)") from None
    except PermissionError:
        raise LabError(f"program not executable: {argv[0]}") from None
    finally:
        if log_file is not None:
            log_file.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def stop_group(proc: subprocess.Popen, term_grace: float = 3.0) -> int:
    """SIGTERM the process group, SIGKILL it after `term_grace` seconds; always reap.

    Returns the leader's exit status (negative: killed by that signal).
    """
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=term_grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
    return proc.wait()


def group_alive(pgid: int) -> bool:
    """True while any process of the group exists (zombies included: not yet reaped)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
