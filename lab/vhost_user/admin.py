"""A small admin socket for a running back end: one JSON object per line in, one per line out.

A thread accepts clients and reads their lines (a slow or silent client never stalls the
rings); each command is handed to the daemon's loop through a wake-up socket the server
watches, and executed there, so device state is only ever touched by the loop thread.
Replies: {"ok": true, ...} or {"ok": false, "error": "one line"}.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import queue
import socket
import threading
from typing import Any, Callable

from lab.errors import LabError
from lab.vhost_user.server import close_listener, listen_unix

log = logging.getLogger(__name__)

CLIENT_TIMEOUT = 10.0
EXECUTE_TIMEOUT = 5.0
MAX_LINE = 64 << 10

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class AdminSocket:
    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._listener = listen_unix(path, 4, f"admin socket {path}")
        self._listener.settimeout(0.2)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._pending: queue.Queue[tuple[dict[str, Any], concurrent.futures.Future]] = queue.Queue()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="admin", daemon=True)
        self._thread.start()

    @property
    def fileobj(self) -> socket.socket:
        """Readable when commands wait for service() on the loop thread."""
        return self._wake_r

    def service(self) -> None:
        try:
            self._wake_r.recv(4096)
        except BlockingIOError:
            pass
        while True:
            try:
                request, future = self._pending.get_nowait()
            except queue.Empty:
                return
            try:
                reply = {"ok": True, **self._handler(request)}
            except LabError as exc:
                reply = {"ok": False, "error": str(exc)}
            future.set_result(reply)

    def close(self) -> None:
        self._closing.set()
        self._thread.join(2.0)
        self._wake_r.close()
        self._wake_w.close()
        close_listener(self._listener, self.path)

    # ---- the client thread ---------------------------------------------------------------

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with client:
                try:
                    self._converse(client)
                except (OSError, ValueError) as exc:
                    log.warning("admin client dropped: %s", exc)

    def _converse(self, client: socket.socket) -> None:
        client.settimeout(CLIENT_TIMEOUT)
        stream = client.makefile("rb")
        while not self._closing.is_set():
            line = stream.readline(MAX_LINE + 1)
            if not line:
                return
            if len(line) > MAX_LINE:
                raise ValueError(f"admin line longer than {MAX_LINE} bytes")
            client.sendall(json.dumps(self._execute(line)).encode() + b"\n")

    def _execute(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError as exc:
            return {"ok": False, "error": f"not JSON: {exc}"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "a command is a JSON object"}
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._pending.put((request, future))
        self._wake_w.send(b"\0")
        try:
            return future.result(EXECUTE_TIMEOUT)
        except concurrent.futures.TimeoutError:
            return {"ok": False, "error": f"the daemon did not execute the command within {EXECUTE_TIMEOUT}s"}
