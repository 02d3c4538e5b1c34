"""SSH and SFTP into a running guest (paramiko), with deadlines on everything."""

from __future__ import annotations

import dataclasses
import logging
import shlex
import time
from pathlib import Path

import paramiko

from lab.errors import LabError, TimeoutExpired

log = logging.getLogger(__name__)
# Refused attempts while sshd starts are expected, and paramiko logs each with a traceback;
# real failures reach the caller as our exceptions, carrying paramiko's message.
logging.getLogger("paramiko").setLevel(logging.CRITICAL)

_POLL = 0.005


@dataclasses.dataclass(frozen=True)
class Result:
    command: str
    exit_status: int
    stdout: str
    stderr: str


class CommandFailed(LabError):
    def __init__(self, result: Result, where: str) -> None:
        detail = (result.stderr.strip() or result.stdout.strip())[-2000:]
        super().__init__(f"command on {where} exited {result.exit_status}: {result.command}\n{detail}")
        self.result = result


class GuestSSH:
    """One SSH connection to the guest as root."""

    def __init__(self, client: paramiko.SSHClient, where: str) -> None:
        self._client = client
        self.where = where

    @classmethod
    def connect(cls, port: int, key: Path, timeout: float, host: str = "127.0.0.1") -> GuestSSH:
        """Retry until sshd answers or `timeout` passes (user-net accepts TCP before sshd does)."""
        pkey = paramiko.PKey.from_path(key)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            client = paramiko.SSHClient()
            # Fresh host keys on every image build: nothing to pin against.
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            left = max(0.5, deadline - time.monotonic())
            try:
                client.connect(
                    host,
                    port,
                    username="root",
                    pkey=pkey,
                    allow_agent=False,
                    look_for_keys=False,
                    timeout=min(3.0, left),
                    banner_timeout=min(5.0, left),
                    auth_timeout=min(10.0, left),
                )
                return cls(client, f"root@{host}:{port}")
            except (paramiko.SSHException, OSError, EOFError) as exc:
                client.close()
                last = exc
                time.sleep(0.05)
        raise TimeoutExpired(f"SSH to {host}:{port} not up after {timeout:.0f}s: {last}")

    def run(self, command: str, timeout: float = 60.0, check: bool = True) -> Result:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise LabError(f"SSH connection to {self.where} is closed")
        chan = transport.open_session(timeout=timeout)
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        try:
            chan.exec_command(command)
            while True:
                if chan.recv_ready():
                    out += chan.recv(65536)
                elif chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                elif (chan.exit_status_ready() and chan.eof_received) or chan.closed:
                    # sshd may send exit-status before it has forwarded all of the command's
                    # output (a loaded guest showed it): the output is complete only at EOF.
                    break
                elif time.monotonic() > deadline:
                    raise TimeoutExpired(
                        f"command on {self.where} still running after {timeout:.0f}s: {command}\n"
                        f"{bytes(err or out)[-1000:].decode(errors='replace')}"
                    )
                else:
                    time.sleep(_POLL)
            while chan.recv_ready():  # data that raced with the exit status check
                out += chan.recv(65536)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
            status = chan.recv_exit_status() if chan.exit_status_ready() else -1
        finally:
            chan.close()
        result = Result(command, status, out.decode(errors="replace"), err.decode(errors="replace"))
        log.debug("guest %r -> %d", command, status)
        if check and status != 0:
            raise CommandFailed(result, self.where)
        return result

    def start_detached(self, command: str, log: str = "/dev/null") -> None:
        """Run shell `command` in the background there, output to `log`, and return at once.
        Only the command goes to the background, its output away from the SSH channel, which
        therefore closes when this returns; setsid and nohup: it outlives the connection (a
        migration's source dies with its connections)."""
        self.run(f"{{ setsid nohup sh -c {shlex.quote(command)} > {shlex.quote(log)} 2>&1 < /dev/null & }}")

    def disk_by_serial(self, serial: str, timeout: float = 10.0) -> str:
        """/dev path of the guest's virtio disk with this serial (names follow probe order)."""
        script = (
            'for d in /sys/block/*; do [ "$(cat $d/serial 2>/dev/null)" = '
            f"{shlex.quote(serial)} ] && echo /dev/${{d##*/}}; done; true"
        )
        found = self.run(script, timeout=timeout).stdout.split()
        if len(found) != 1:
            raise LabError(f"guest has {len(found)} disks with serial {serial!r}: {found}")
        return found[0]

    def put(self, local: Path, remote: str) -> None:
        with self._client.open_sftp() as sftp:
            sftp.put(str(local), remote)

    def get(self, remote: str, local: Path) -> None:
        with self._client.open_sftp() as sftp:
            sftp.get(remote, str(local))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> GuestSSH:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
