"""A second host on this machine: a network namespace joined to this one by a veth pair, with an
sshd on its address, for multi-host scenarios (lab.remote reaches it as it would any host).

The root namespace plays the first host (one end of the pair), the new namespace the second
(the other end). Both ends get the addresses of one /30 drawn at random from 10.0.0.0/8 and
checked against this host's addresses and routes, so parallel workers (pytest-xdist) and the
host's own networks never clash. The filesystem stays shared: it is the two hosts' shared
storage. Everything is removed on exit, also on failure: the sshd (started through
lab.qemu.process, so it also dies with the lab), every process still in the namespace (what sshd
started for its clients lives there, outside sshd's process group), the veth pair, the namespace.
Only a lab killed by SIGKILL leaves a namespace and its pair behind (no kernel object dies with
the process that made it): each name carries its maker's pid, and the next namespace made on the
host first removes those whose maker is gone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Self

from lab.errors import LabError, TimeoutExpired
from lab.host import tool
from lab.qemu import process
from lab.qemu.console import tail

POOL = ipaddress.ip_network("10.0.0.0/8")
SUBNET_PREFIX = 30  # two addresses: this host's end and the namespace's
COMMAND_SECONDS = 10.0
SSHD_UP_SECONDS = 10.0
GONE_SECONDS = 5.0
SSH_PORT = 22
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21  # capability numbers (linux/capability.h)
# Compiled into Debian's sshd (privilege separation); its service unit creates it at boot.
PRIVSEP_DIR = Path("/run/sshd")
_NAME = re.compile(r"lab-(\d+)-([0-9a-f]{6})")  # lab-<pid of its maker>-<token>

SSHD_CONFIG = """\
# sshd of a lab namespace host: root with the lab's key only, nothing that waits at login.
ListenAddress {address}:{port}
HostKey {dir}/host_key
AuthorizedKeysFile {dir}/authorized_keys
PidFile none
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
PrintLastLog no
# the files are in a temporary directory under the world-writable /tmp, not in a home
StrictModes no
# lab.remote opens one session per command and one per process it keeps running
MaxSessions 100
Subsystem sftp internal-sftp
"""


def unavailable() -> str | None:
    """Why namespace hosts cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not _capable(CAP_SYS_ADMIN, CAP_NET_ADMIN):
        return "network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN (an unprivileged container?)"
    try:
        tool("sshd")
        done = _ip("netns", "list", check=False)
    except LabError as exc:
        return str(exc)
    return f"`ip netns` is unavailable: {done.stderr.strip()}" if done.returncode else None


def _capable(*capabilities: int) -> bool:
    """This process holds every one of `capabilities` (effective set)."""
    with open("/proc/self/status") as status:
        effective = next(int(line.split()[1], 16) for line in status if line.startswith("CapEff:"))
    return all(effective >> cap & 1 for cap in capabilities)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    argv = [tool("ip"), *args]
    try:
        done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=COMMAND_SECONDS)
    except subprocess.TimeoutExpired:
        raise TimeoutExpired(f"`{shlex.join(argv)}` still running after {COMMAND_SECONDS:.0f}s") from None
    if check and done.returncode != 0:
        raise LabError(f"`{shlex.join(argv)}` failed: {done.stderr.strip()}")
    return done


def _taken_networks() -> list[ipaddress.IPv4Network]:
    """This host's IPv4 networks: those of its addresses and of its routes (default aside)."""
    taken = []
    for link in json.loads(_ip("-j", "-4", "addr").stdout or "[]"):
        for addr in link.get("addr_info", []):
            taken.append(ipaddress.ip_network(f"{addr['local']}/{addr['prefixlen']}", strict=False))
    for route in json.loads(_ip("-j", "-4", "route").stdout or "[]"):
        if route.get("dst", "default") != "default":
            taken.append(ipaddress.ip_network(route["dst"], strict=False))
    return taken


def free_subnet() -> ipaddress.IPv4Network:
    """A /30 of POOL that overlaps none of this host's networks."""
    taken = _taken_networks()
    count = POOL.num_addresses >> (32 - SUBNET_PREFIX)
    for _ in range(100):
        start = POOL.network_address + (secrets.randbelow(count) << (32 - SUBNET_PREFIX))
        candidate = ipaddress.ip_network(f"{start}/{SUBNET_PREFIX}")
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    raise LabError(f"no free /{SUBNET_PREFIX} left in {POOL} for a namespace host")


def _host_link(token: str) -> str:
    return f"lab{token}h"  # link names: 15 characters at most


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _pids(name: str) -> list[int]:
    return [int(pid) for pid in _ip("netns", "pids", name, check=False).stdout.split()]


def _remove(name: str, host_link: str) -> None:
    """Kill what still runs in namespace `name`, then delete its veth pair and itself."""
    deadline = time.monotonic() + GONE_SECONDS
    while pids := _pids(name):
        if time.monotonic() > deadline:
            raise LabError(f"processes {pids} in namespace {name} survive SIGKILL")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    # deleting one end deletes both, at once; the namespace would free its end only later
    _ip("link", "del", host_link, check=False)
    _ip("netns", "del", name, check=False)


def orphans(maker: int | None = None) -> list[str]:
    """The namespaces of lab processes that died without removing them (a SIGKILL leaves them
    behind: no kernel object dies with the process that made it), and those `maker` made."""
    found = (_NAME.fullmatch(line.split()[0]) for line in _ip("netns", "list").stdout.splitlines() if line.strip())
    return [m.group(0) for m in found
            if m is not None and (int(m.group(1)) == maker or not _alive(int(m.group(1))))]


def remove_stale(maker: int | None = None) -> None:
    for name in orphans(maker):
        _remove(name, _host_link(_NAME.fullmatch(name).group(2)))


class Namespace:
    """A network namespace and a veth pair on a private /30: `address` inside, `peer_address`
    on this host's end. The name carries the pid of the process that made it (remove_stale)."""

    def __init__(self) -> None:
        token = secrets.token_hex(3)
        self.name = f"lab-{os.getpid()}-{token}"
        self.host_link = _host_link(token)
        self.link = f"lab{token}n"
        subnet = free_subnet()
        self.peer_address, self.address = (str(a) for a in subnet.hosts())
        self.prefix = subnet.prefixlen

    def create(self) -> Self:
        remove_stale()
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.host_link, "type", "veth", "peer", "name", self.link, "netns", self.name)
            _ip("addr", "add", f"{self.peer_address}/{self.prefix}", "dev", self.host_link)
            _ip("link", "set", self.host_link, "up")
            _ip("-n", self.name, "addr", "add", f"{self.address}/{self.prefix}", "dev", self.link)
            _ip("-n", self.name, "link", "set", self.link, "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise
        return self

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the namespace."""
        return [tool("ip"), "netns", "exec", self.name, *argv]

    def pids(self) -> list[int]:
        """The processes inside (none once the namespace is gone)."""
        return _pids(self.name)

    def remove(self) -> None:
        """Kill what still runs inside, then delete the pair and the namespace; safe to repeat."""
        _remove(self.name, self.host_link)

    def __enter__(self) -> Self:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()


class Sshd:
    """sshd inside `namespace`, on its address: root logs in with `key` (its public half is
    `key`.pub), by key only. Config, host key and authorized key live in a temporary directory
    removed by stop(); the log goes to `log`."""

    def __init__(self, namespace: Namespace, key: Path, log: Path) -> None:
        self.namespace = namespace
        self.key = Path(key)
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.directory: Path | None = None  # config and keys, while it runs

    def start(self) -> Self:
        public = Path(f"{self.key}.pub")
        if not public.is_file():
            raise LabError(f"no public key {public} next to the private key {self.key}")
        self.directory = Path(tempfile.mkdtemp(prefix="lab-sshd-"))
        try:
            host_key = self.directory / "host_key"
            subprocess.run([tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", self.namespace.name,
                            "-f", str(host_key)], check=True, capture_output=True, timeout=COMMAND_SECONDS)
            (self.directory / "authorized_keys").write_bytes(public.read_bytes())
            config = self.directory / "sshd_config"
            config.write_text(SSHD_CONFIG.format(address=self.namespace.address, port=SSH_PORT, dir=self.directory))
            PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
            # -D: stays in the foreground (its process group is ours to kill), -e: log to stderr
            argv = self.namespace.argv([tool("sshd"), "-D", "-e", "-f", str(config)])
            self.proc = process.spawn(argv, log=self.log)
            self._wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + SSHD_UP_SECONDS
        while True:
            try:
                socket.create_connection((self.namespace.address, SSH_PORT), timeout=1.0).close()
                return
            except OSError as exc:
                error = exc
            if self.proc.poll() is not None:
                raise LabError(f"sshd in namespace {self.namespace.name} exited {self.proc.returncode}: "
                               f"{tail(self.log, 3)}")
            if time.monotonic() > deadline:
                raise TimeoutExpired(f"sshd in namespace {self.namespace.name} not listening on "
                                     f"{self.namespace.address}:{SSH_PORT} after {SSHD_UP_SECONDS:.0f}s: {error}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop sshd (the sessions it started live on until the namespace goes); safe to repeat."""
        if self.proc is not None:
            process.stop_group(self.proc)
            self.proc = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def namespace_host(key: Path, log: Path) -> Iterator[Namespace]:
    """A second host: a namespace with sshd on its address (root logs in with `key`, sshd logs
    to `log`); sshd, the processes inside, the veth pair and the namespace are gone on exit."""
    with Namespace() as namespace, Sshd(namespace, key, log):
        yield namespace
