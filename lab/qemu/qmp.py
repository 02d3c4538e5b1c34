"""A small synchronous QMP client over qemu.qmp, with a JSON-lines transcript.

Every command, reply and event seen goes to the transcript (an artifact of the test), so a
failure can be replayed from the file without rerunning QEMU.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError as _LibQMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from lab.errors import LabError, TimeoutExpired

# qemu.qmp reports every disconnect at INFO/ERROR level; the transcript is our record instead.
logging.getLogger("qemu.qmp").setLevel(logging.WARNING)


class QMPError(LabError):
    """QEMU refused a command (error class and description) or the monitor went away."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMP:
    def __init__(self, socket_path: Path, transcript: Path, timeout: float = 30.0) -> None:
        self._path = socket_path
        self._transcript = open(transcript, "a", encoding="utf-8")
        self._timeout = timeout
        self._mon: QEMUMonitorProtocol | None = None

    def connect(self, deadline_seconds: float, alive: Callable[[], bool] = lambda: True) -> None:
        """Connect and negotiate, retrying while QEMU is still creating the socket.

        Gives up as soon as `alive()` is false: QEMU died during its initialisation.
        """
        deadline = time.monotonic() + deadline_seconds
        while True:
            error = "socket not created"
            # Waiting for the file first keeps qemu.qmp from logging an error per attempt.
            if self._path.exists():
                mon = QEMUMonitorProtocol(str(self._path))
                try:
                    greeting = mon.connect()
                    break
                except (_LibQMPError, OSError) as exc:
                    error = str(exc)
            if not alive():
                raise LabError(f"QEMU exited before its monitor came up: {error}")
            if time.monotonic() >= deadline:
                raise TimeoutExpired(f"QMP socket {self._path} not ready: {error}")
            time.sleep(0.02)
        mon.settimeout(self._timeout)
        self._mon = mon
        self._record("greeting", greeting)

    def cmd(self, name: str, **args: Any) -> Any:
        """Execute `name`; return its result or raise QMPError with QEMU's class and desc."""
        mon = self._require()
        self._record("send", {"execute": name, "arguments": args})
        try:
            reply = mon.cmd_raw(name, args or None)
        except TimeoutError:
            raise TimeoutExpired(f"QMP {name}: no reply within {self._timeout:.0f}s") from None
        except (_LibQMPError, OSError, EOFError) as exc:
            raise QMPError(name, "Disconnected", str(exc) or type(exc).__name__) from None
        self._record("reply", reply)
        if "error" in reply:
            err = reply["error"]
            raise QMPError(name, err.get("class", "?"), err.get("desc", "?"))
        return reply.get("return")

    def quit(self, timeout: float) -> None:
        """Ask QEMU to exit; a monitor that is already gone or slow is not an error here."""
        mon = self._require()
        self._record("send", {"execute": "quit"})
        mon.settimeout(timeout)
        try:
            self._record("reply", mon.cmd_raw("quit"))
        except (TimeoutError, _LibQMPError, OSError, EOFError) as exc:
            self._record("error", str(exc) or type(exc).__name__)
        finally:
            mon.settimeout(self._timeout)

    def events(self, wait: float = 0.0) -> list[dict]:
        """Pending events; if none, wait up to `wait` seconds for at least one."""
        mon = self._require()
        try:
            got = mon.get_events(wait=float(wait) if wait else False)
        except TimeoutError:
            got = []
        for event in got:
            self._record("event", event)
        return got

    def wait_event(self, name: str, timeout: float) -> dict:
        """The next event called `name` (others are recorded and dropped)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            for event in self.events(wait=left):
                if event.get("event") == name:
                    return event
        raise TimeoutExpired(f"QMP event {name} not seen within {timeout:.0f}s")

    def close(self) -> None:
        if self._mon is not None:
            mon, self._mon = self._mon, None
            try:
                for event in mon.get_events(wait=False):
                    self._record("event", event)
                mon.close()
            except (TimeoutError, _LibQMPError, OSError, EOFError):
                pass  # the peer is gone already (after quit): nothing left to close
        if not self._transcript.closed:
            self._transcript.close()

    @property
    def connected(self) -> bool:
        return self._mon is not None

    def _require(self) -> QEMUMonitorProtocol:
        if self._mon is None:
            raise LabError(f"QMP {self._path} is not connected")
        return self._mon

    def _record(self, kind: str, message: Any) -> None:
        if not self._transcript.closed:
            line = {"ts": round(time.time(), 6), "dir": kind, "msg": message}
            self._transcript.write(json.dumps(line, default=str) + "\n")
            self._transcript.flush()
