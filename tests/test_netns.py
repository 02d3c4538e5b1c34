"""A second host made of a network namespace (lab.netns), reached over SSH (lab.remote): it
runs commands in its own network, keeps processes leashed to the connection, relays a unix
socket, and leaves nothing behind: no namespace, no veth, no sshd, no process."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import netns
from lab.remote import RemoteHost, UnixForward

pytestmark = pytest.mark.skipif(netns.unavailable() is not None, reason=f"{netns.unavailable()}")

TIMEOUT = 10.0
ECHO = """
import socket, sys
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen()
conn, _ = server.accept()
while data := conn.recv(4096):
    conn.sendall(data.upper())
"""


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")  # a zombie is gone too


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not gone(pid):
        assert time.monotonic() < deadline, f"process {pid} still there"
        time.sleep(0.02)


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@pytest.fixture
def second_host(key: Path, tmp_path: Path) -> Iterator[tuple[netns.Namespace, RemoteHost]]:
    with (
        netns.namespace_host(key, tmp_path / "sshd.log") as namespace,
        RemoteHost.connect(netns.SSH_PORT, key, TIMEOUT, host=namespace.address) as host,
    ):
        yield namespace, host


def test_commands_run_in_the_namespace_and_everything_goes(key: Path, tmp_path: Path) -> None:
    with netns.Namespace() as namespace, netns.Sshd(namespace, key, tmp_path / "sshd.log") as server:
        private = server.directory
        sshd = namespace.pids()
        with RemoteHost.connect(netns.SSH_PORT, key, TIMEOUT, host=namespace.address) as host:
            assert host.address == namespace.address
            there = host.run("ip -4 -o addr show").stdout
            assert f"{namespace.link}    inet {namespace.address}/30" in there
            assert namespace.peer_address not in there  # that end is on this host
            assert host.run("readlink /proc/self/ns/net").stdout.strip() != os.readlink("/proc/self/ns/net")
            host.write_text(tmp_path / "note", "shared storage")
            assert host.read_text(tmp_path / "note") == "shared storage"
            with pytest.raises(FileNotFoundError):
                host.read_text(tmp_path / "missing")
    assert sshd and all(gone(pid) for pid in sshd)
    assert namespace.name not in subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
    for link in (namespace.host_link, namespace.link):
        assert subprocess.run(["ip", "link", "show", link], check=False, capture_output=True).returncode != 0
    assert private is not None and not private.exists()


def test_processes_end_with_their_channel_or_their_connection(
    second_host: tuple[netns.Namespace, RemoteHost], tmp_path: Path, key: Path
) -> None:
    namespace, host = second_host
    log = tmp_path / "remote.log"
    exits = host.start(["sh", "-c", "echo working; exit 3"], log, tmp_path)
    assert exits.wait(TIMEOUT) == 3
    assert log.read_text() == "working\n"

    sleeper = host.start(["sleep", "1000"], log, tmp_path)
    assert sleeper.pid in namespace.pids()
    assert os.getpgid(sleeper.pid) != os.getpgid(0)
    assert sleeper.poll() is None
    assert sleeper.stop() == -signal.SIGTERM
    wait_gone(sleeper.pid)

    stubborn = host.start(["sh", "-c", "trap '' TERM; sleep 1000"], log, tmp_path, grace=0.3)
    assert stubborn.stop() == -signal.SIGKILL
    wait_gone(stubborn.pid)

    # the lab dying is its connection dropping: nothing it started there survives it
    other = RemoteHost.connect(netns.SSH_PORT, key, TIMEOUT, host=namespace.address)
    orphan = other.start(["sleep", "1000"], log, tmp_path).pid
    other.close()
    wait_gone(orphan)


def test_unix_socket_relayed_through_ssh(second_host: tuple[netns.Namespace, RemoteHost], tmp_path: Path) -> None:
    _, host = second_host
    there = tmp_path / "echo.sock"
    server = host.start(["python3", "-c", ECHO, str(there)], tmp_path / "echo.log", tmp_path)
    deadline = time.monotonic() + TIMEOUT
    while not host.is_socket(there):
        assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "echo.log").read_text()
        time.sleep(0.02)
    forward = UnixForward(host, tmp_path / "here.sock", there)
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(TIMEOUT)
            client.connect(str(forward.path))
            client.sendall(b"qmp over ssh")
            answer = b""
            while len(answer) < 12:
                answer += client.recv(4096)
            assert answer == b"QMP OVER SSH"
    finally:
        forward.close()
        server.stop()
    assert not forward.path.exists()


def test_namespaces_of_a_killed_lab_go_with_the_next_one() -> None:
    """A SIGKILLed lab cannot remove its namespace: the next one made removes it."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    token = secrets.token_hex(3)
    name, link = f"lab-{dead.pid}-{token}", f"lab{token}h"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "link", "add", link, "type", "veth", "peer", "name", f"lab{token}n", "netns", name],
                       check=True)
        with netns.Namespace() as namespace:
            assert name not in subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
            assert subprocess.run(["ip", "link", "show", link], check=False, capture_output=True).returncode != 0
            assert namespace.name.startswith(f"lab-{os.getpid()}-")
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
