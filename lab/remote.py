"""Another host reached by SSH (paramiko), and the lab's parts placed there: a back end process
and a QEMU machine.

RemoteHost is one root SSH connection (GuestSSH's, to a host instead of a guest): commands,
files, and processes leashed to the connection. `start()` runs a process there in its own
process group under a small shell leash that holds the SSH channel: when the channel closes
(stop(), or the connection drops because the lab died, even by SIGKILL) the leash sends SIGTERM
to the group and SIGKILL after a grace period. It is the remote counterpart of the parent-death
signal lab.qemu.process gives local children: nothing the lab starts there outlives it.

RemoteMachine is a migration destination (a Machine) whose QEMU runs there, with the argv of
build_argv. Only the guest's SSH forward moves, from 127.0.0.1 to the host's address, so the lab
reaches the guest after the migration; its port is 0 (the host picks a free one; QMP tells
which), since this host cannot tell which ports are free on another. QMP stays on the unix
socket build_argv gives it, on the remote host, reached through the SSH connection (UnixForward):
QMP has no authentication, so a TCP listener on the host's address would hand full control of
the guest, its memory included, to anyone who can reach that address, while the SSH connection
is already authenticated and encrypted. RemoteBackend is a BackendProcess run there.

Paths are the same on both hosts: the image cache, the lab's checkout and its Python
interpreter (the back end is `python -m lab backend`), and the job's directory with the disk
image are on shared storage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import select
import shlex
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import paramiko

from images import READY_MARKER
from lab.backends import REPO, STOP_TIMEOUT, BackendError, BackendProcess
from lab.errors import LabError, TimeoutExpired
from lab.guest.ssh import GuestSSH
from lab.qemu.machine import (
    QMP_UP_SECONDS,
    SSH_AFTER_MARKER_SECONDS,
    Machine,
    MachineConfig,
    build_argv,
)
from lab.qemu.qmp import QMP

COMMAND_SECONDS = 10.0
TERM_GRACE = 3.0  # seconds between the leash's SIGTERM and SIGKILL
STOP_MARGIN = 5.0  # beyond the grace: the leash's report crossing the connection
POLL_SECONDS = 0.02
_UNIX_PATH_MAX = 107

# Run as `sh -c LEASH leash LOG CWD GRACE_TENTHS ARGV...` by sshd, which makes it the leader of a
# new session and process group. Protocol on the channel: stdout says "pid N" once started and
# "exit S" when the process ended by itself (S as from `wait`: 128+N for signal N); EOF on stdin
# (the channel or the connection closed) ends the group. The child starts before the trap, so
# it keeps the default SIGTERM; the shells ignore it, deliver it to the group and follow up with
# SIGKILL, which ends them too. The watcher reads the channel through fd 3: a background job's
# stdin is /dev/null.
LEASH = r"""
log=$1 cwd=$2 tenths=$3
shift 3
cd "$cwd" || exit 126
exec 3<&0
"$@" </dev/null >>"$log" 2>&1 3<&- &
child=$!
echo "pid $child"
trap '' TERM
(
    cat <&3 >/dev/null
    kill -TERM 0
    i=0
    while kill -0 "$child" 2>/dev/null && [ "$i" -lt "$tenths" ]; do sleep 0.1; i=$((i + 1)); done
    kill -KILL 0
) >/dev/null 2>&1 &
wait "$child"
echo "exit $?"
kill -KILL 0
"""

# Relays the channel's stdin and stdout to a unix socket on the host (argv[1]): OpenSSH would do
# it itself (direct-streamlocal channels), paramiko cannot ask for one.
RELAY = r"""
import select, socket, sys
peer = socket.socket(socket.AF_UNIX)
peer.connect(sys.argv[1])
stdin, stdout = sys.stdin.buffer.raw, sys.stdout.buffer
while True:
    for ready in select.select([stdin, peer], [], [])[0]:
        data = stdin.read(65536) if ready is stdin else peer.recv(65536)
        if not data:
            sys.exit()
        if ready is stdin:
            peer.sendall(data)
        else:
            stdout.write(data)
            stdout.flush()
"""


class RemoteHost(GuestSSH):
    """Root on another host: `RemoteHost.connect(22, key, timeout, host=ADDRESS)`.

    Files go through one SFTP session: every command runs in root's login shell there, whose
    start-up files may be slow (0.5 s per command on the development machines: bash sources
    ~/.bashrc under sshd), so the lab polls through SFTP, not through commands."""

    def __init__(self, client: paramiko.SSHClient, where: str) -> None:
        super().__init__(client, where)
        self._sftp: paramiko.SFTPClient | None = None

    @property
    def address(self) -> str:
        """The host's address as seen from here: where its services listen for this host."""
        return self._transport().getpeername()[0]

    @property
    def local_address(self) -> str:
        """This host's address as seen from there: where this host's services listen for it."""
        return self._transport().sock.getsockname()[0]

    def _transport(self) -> paramiko.Transport:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise LabError(f"SSH connection to {self.where} is closed")
        return transport

    def exec_channel(self, argv: Sequence[str]) -> paramiko.Channel:
        """A channel running `argv` there: its stdin and stdout are the channel's."""
        channel = self._transport().open_session(timeout=COMMAND_SECONDS)
        channel.exec_command(shlex.join(argv))
        return channel

    def start(self, argv: Sequence[str], log: Path, cwd: Path, grace: float = TERM_GRACE) -> RemoteProcess:
        """Run `argv` there in `cwd`, output appended to `log` (a path there), in its own
        process group leashed to this connection."""
        tenths = str(max(1, round(grace * 10)))
        channel = self.exec_channel(["sh", "-c", LEASH, "leash", str(log), str(cwd), tenths, *argv])
        return RemoteProcess(channel, shlex.join(argv), self.where, grace)

    def _files(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = self._client.open_sftp()
        return self._sftp

    def read_text(self, path: Path) -> str:
        """A file there (FileNotFoundError if it does not exist)."""
        with self._files().open(str(path)) as file:
            return file.read().decode(errors="replace")

    def write_text(self, path: Path, text: str) -> None:
        with self._files().open(str(path), "w") as file:
            file.write(text.encode())

    def is_socket(self, path: Path) -> bool:
        try:
            return stat.S_ISSOCK(self._files().stat(str(path)).st_mode or 0)
        except FileNotFoundError:
            return False

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        super().close()


class RemoteProcess:
    """A process started by RemoteHost.start: the part of subprocess.Popen the lab uses (pid,
    returncode, poll, wait), and stop()."""

    def __init__(self, channel: paramiko.Channel, command: str, where: str, grace: float) -> None:
        self.command = command
        self.returncode: int | None = None
        self._channel = channel
        self._where = where
        self._grace = grace
        self._out = b""
        deadline = time.monotonic() + COMMAND_SECONDS
        while True:
            ended = self._read()
            started = re.search(rb"^pid (\d+)$", self._out, re.MULTILINE)
            if started is not None:
                break
            if ended or time.monotonic() > deadline:
                why = channel.recv_stderr(4096).decode(errors="replace").strip() if ended else "no answer"
                channel.close()
                raise LabError(f"could not start `{command}` on {where}: {why or 'the leash exited'}")
            time.sleep(POLL_SECONDS)
        self.pid = int(started.group(1))  # there

    def _read(self) -> bool:
        """Take what the leash said; True once it will say no more."""
        ended = self._channel.eof_received or self._channel.closed  # before the last data is taken
        while self._channel.recv_ready():
            self._out += self._channel.recv(4096)
        return ended

    def poll(self) -> int | None:
        if self.returncode is None:
            ended = self._read()
            found = re.search(rb"^exit (\d+)$", self._out, re.MULTILINE)
            if found:
                status = int(found.group(1))
                self.returncode = -(status - 128) if status > 128 else status
            elif ended:  # the leash was killed with the group: SIGKILL
                self.returncode = -signal.SIGKILL
            if self.returncode is not None:
                self._channel.close()
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.command, timeout)
            time.sleep(POLL_SECONDS)
        return code

    def stop(self) -> int:
        """End the group (SIGTERM, then SIGKILL after the grace); the exit status. Whatever
        happens, the channel is closed, and the leash acts on that."""
        try:
            if self.poll() is None:
                with contextlib.suppress(paramiko.SSHException, OSError):  # a dead connection: EOF too
                    self._channel.shutdown_write()
                return self.wait(self._grace + STOP_MARGIN)
            return self.returncode
        except subprocess.TimeoutExpired:
            raise TimeoutExpired(f"`{self.command}` on {self._where} still running after SIGKILL") from None
        finally:
            self._channel.close()


class UnixForward:
    """A unix socket here whose every connection is relayed through the SSH connection to a unix
    socket on the host (`ssh -L HERE:THERE` of OpenSSH), by a relay run there with python3."""

    def __init__(self, host: RemoteHost, here: Path, there: Path) -> None:
        if len(str(here)) > _UNIX_PATH_MAX:
            raise LabError(f"unix socket path longer than {_UNIX_PATH_MAX} bytes: {here}")
        self.path = here
        self._host, self._there = host, there
        self._stop = threading.Event()
        self._pumps: list[threading.Thread] = []
        here.unlink(missing_ok=True)
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(str(here))
        self._listener.listen()
        self._listener.settimeout(0.2)  # so the accept loop sees close()
        self._acceptor = threading.Thread(target=self._accept, name=f"forward {here.name}", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                channel = self._host.exec_channel(["python3", "-c", RELAY, str(self._there)])
            except (LabError, paramiko.SSHException, OSError):
                conn.close()  # the client sees the connection end, as if the socket refused it
                continue
            pump = threading.Thread(target=self._pump, args=(conn, channel), daemon=True)
            self._pumps.append(pump)
            pump.start()

    def _pump(self, conn: socket.socket, channel: paramiko.Channel) -> None:
        with conn, channel:
            while not self._stop.is_set():
                ready = select.select([conn, channel], [], [], 0.2)[0]
                if conn in ready:
                    data = conn.recv(65536)
                    if not data:
                        return
                    channel.sendall(data)
                if channel in ready:
                    data = channel.recv(65536)
                    if not data:
                        return
                    conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(5.0)
        for pump in self._pumps:
            pump.join(5.0)
        self._listener.close()
        self.path.unlink(missing_ok=True)


class RemoteMachine(Machine):
    """A migration destination whose QEMU runs on `host`. `config.workdir` is a path there; the
    QMP transcript and the local end of its QMP socket go to `local_dir` here (default: the
    same path, shared storage). `config.accel` must be set: the source's accelerator (the other
    host cannot be probed from here)."""

    def __init__(self, config: MachineConfig, host: RemoteHost, local_dir: Path | None = None) -> None:
        if config.incoming is None or config.accel is None:
            raise LabError(f"machine {config.name}: a machine on another host is a migration destination "
                           "(incoming) with its accelerator given")
        super().__init__(config)
        self.host = host
        self.local_dir = Path(local_dir or config.workdir)
        self._forward: UnixForward | None = None
        self._ssh_port: int | None = None

    def launch(self) -> RemoteMachine:
        if self.proc is not None:
            raise LabError(f"machine {self.config.name} already launched")
        cfg = self.config
        assert self.accel is not None
        workdir = shlex.quote(str(cfg.workdir))
        self.host.run(f"mkdir -p {workdir} && rm -f {workdir}/qmp.sock {workdir}/console.sock")
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.argv = build_argv(cfg, self.accel, 0, ssh_address=self.host.address)
        self.host.write_text(cfg.path("qemu.cmdline"), shlex.join(self.argv) + "\n")
        self._launched_at = time.monotonic()
        self.proc = self.host.start(self.argv, log=cfg.path("qemu.log"), cwd=cfg.workdir)
        try:
            self._forward = UnixForward(self.host, self.local_dir / "qmp-ssh.sock", cfg.socket_path("qmp.sock"))
            self.qmp = QMP(self._forward.path, self.local_dir / "qmp.jsonl")
            self.qmp.connect(self.scaled(QMP_UP_SECONDS), alive=self.alive)
            self._ssh_port = self._forwarded_ssh_port()
        except (LabError, OSError) as exc:
            self.shutdown()
            raise LabError(f"QEMU for {cfg.name} on {self.host.where} failed to start: {exc}\n"
                           f"{self._log_tail()}") from None
        return self

    def _forwarded_ssh_port(self) -> int:
        assert self.qmp is not None
        table = self.qmp.cmd("human-monitor-command", **{"command-line": "info usernet"})
        found = re.search(rf"HOST_FORWARD\]\s+\d+\s+{re.escape(self.host.address)}\s+(\d+)\s+\S+\s+22\s", table)
        if found is None:
            raise LabError(f"no SSH forward on {self.host.address} in QEMU's `info usernet`:\n{table}")
        return int(found.group(1))

    def wait_ready(self, marker: str = READY_MARKER) -> float:
        """Wait for SSH to the guest (it arrives by migration: no boot marker)."""
        if not self.alive():
            raise LabError(f"machine {self.config.name} on {self.host.where} is not running:\n{self._log_tail()}")
        self._ssh = GuestSSH.connect(self.ssh_port, self.config.image.key, self.scaled(SSH_AFTER_MARKER_SECONDS),
                                     host=self.host.address)
        self.boot_seconds = time.monotonic() - self._launched_at
        return self.boot_seconds

    def _stop_group(self, term_grace: float = 3.0) -> int:
        """The leash's SIGTERM and SIGKILL of the group there (its own grace)."""
        return self.proc.stop()

    def _forget(self) -> None:
        super()._forget()
        if self._forward is not None:
            self._forward.close()
            self._forward = None

    @property
    def ssh_port(self) -> int:
        """The guest's SSH port on the host's address."""
        if self._ssh_port is None:
            raise LabError(f"machine {self.config.name} is not running")
        return self._ssh_port

    def console(self, timeout: float = 30.0) -> NoReturn:
        raise LabError(f"machine {self.config.name}: the serial console on {self.host.where} is not reachable from here")

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = self.host.read_text(self.config.path("qemu.log"))
        except (OSError, LabError, paramiko.SSHException):
            return "(no QEMU log)"
        return "\n".join(text.splitlines()[-lines:])


@dataclasses.dataclass(kw_only=True)
class RemoteBackend(BackendProcess):
    """A BackendProcess run on `host`: the same argv; its socket, log and image are paths there."""

    host: RemoteHost = dataclasses.field(repr=False)

    @classmethod
    def on(cls, host: RemoteHost, backend: BackendProcess) -> RemoteBackend:
        """`backend` (not started) to run on `host`."""
        fields = {f.name: getattr(backend, f.name) for f in dataclasses.fields(backend) if f.name != "proc"}
        return cls(host=host, **fields)

    def launch(self) -> RemoteBackend:
        self.host.run(f"rm -f {shlex.quote(self.socket)}")
        self.proc = self.host.start(self.argv(), log=self.log, cwd=REPO, grace=STOP_TIMEOUT)
        return self

    @property
    def pid(self) -> int:
        """Refused: BackendProcess's /proc readers would look at this host (proc.pid is the pid
        there)."""
        raise BackendError(f"{self.kind} back end runs on {self.host.where}, not on this host")

    def stop(self) -> int | None:
        proc, self.proc = self.proc, None
        return None if proc is None else proc.stop()

    def kill(self) -> None:
        """SIGKILL: the back end dies mid-flight, as in a crash."""
        if self.proc is not None:
            self.host.run(f"kill -KILL {self.proc.pid}", check=False)
            self.stop()

    def log_text(self) -> str:
        try:
            return self.host.read_text(self.log)
        except FileNotFoundError:
            return ""

    def _socket_ready(self) -> bool:
        return self.host.is_socket(Path(self.socket))
