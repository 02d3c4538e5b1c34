"""What the host must provide: one list of binaries and the Debian packages that ship them.

`lab doctor` reports and installs what is missing; the image builder asks `tool()` for the path
of each binary it runs so a missing one fails with the fix in the message.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lab.errors import LabError


@dataclass(frozen=True)
class Requirement:
    binary: str
    package: str
    static: bool = (
        False  # must be a statically linked ELF (it is copied into the initramfs)
    )


REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("qemu-system-x86_64", "qemu-system-x86"),
    Requirement("qemu-img", "qemu-utils"),
    # Debian 12 ships QSD in qemu-system-common, a dependency of qemu-system-x86
    Requirement("qemu-storage-daemon", "qemu-system-common"),
    Requirement("mmdebstrap", "mmdebstrap"),
    Requirement("mke2fs", "e2fsprogs"),
    Requirement("busybox", "busybox-static", static=True),
    Requirement("depmod", "kmod"),
    Requirement("fio", "fio"),
    Requirement("ssh-keygen", "openssh-client"),
    Requirement("ssh", "openssh-client"),
    # a second host for multi-host migration: sshd in a network namespace (lab.netns)
    Requirement("sshd", "openssh-server"),
    Requirement("ip", "iproute2"),
    Requirement("dpkg-deb", "dpkg"),
    Requirement("apt-get", "apt"),
    Requirement("apt-cache", "apt"),
)

# sbin is often missing from a user's PATH although everything there is runnable
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def _search_path(path: str | None) -> str:
    if path is not None:
        return path
    return os.pathsep.join([os.environ.get("PATH", os.defpath), *_SBIN_DIRS])


def _is_static_elf(file: Path) -> bool:
    """True for an ELF without a PT_INTERP program header (no dynamic loader needed)."""
    with open(file, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
            return False
        phoff = int.from_bytes(head[32:40], "little")
        phentsize = int.from_bytes(head[54:56], "little")
        phnum = int.from_bytes(head[56:58], "little")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    return all(
        int.from_bytes(table[i * phentsize : i * phentsize + 4], "little") != pt_interp
        for i in range(phnum)
    )


def _satisfied(req: Requirement, path: str | None) -> str | None:
    found = shutil.which(req.binary, path=_search_path(path))
    if found is None or (req.static and not _is_static_elf(Path(found))):
        return None
    return found


def check_host(path: str | None = None) -> list[str]:
    """Debian packages to install so every required binary is present (sorted, no duplicates)."""
    return sorted(
        {req.package for req in REQUIREMENTS if _satisfied(req, path) is None}
    )


def tool(binary: str) -> str:
    """Absolute path of a required binary, or a LabError that names the fix."""
    req = next((r for r in REQUIREMENTS if r.binary == binary), None)
    if req is None:
        raise ValueError(f"{binary} is not in lab.host.REQUIREMENTS")
    found = _satisfied(req, None)
    if found is None:
        kind = "a static " if req.static else ""
        raise LabError(
            f"{kind}{binary} is missing (Debian package {req.package}): "
            "run `lab doctor --fix` as root"
        )
    return found


def install_command(packages: list[str]) -> list[str]:
    return ["apt-get", "install", "-y", "--no-install-recommends", *packages]


POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
NO_SERVICES = "#!/bin/sh\n# written by `lab doctor --fix` while it installs: no service starts\nexit 101\n"


def install(packages: list[str]) -> None:
    """Install packages with apt (root only); the package index is refreshed first. The lab
    needs their programs, never their services (openssh-server would start an sshd on the
    host): while apt runs, a policy-rc.d tells the maintainer scripts not to start any, unless
    the host has a policy of its own."""
    with _no_services():
        _apt(packages)


@contextlib.contextmanager
def _no_services() -> Iterator[None]:
    if POLICY_RC_D.exists():
        yield
        return
    POLICY_RC_D.write_text(NO_SERVICES)
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink(missing_ok=True)


def _apt(packages: list[str]) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"], install_command(packages)):
        done = subprocess.run(
            argv,
            check=False,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise LabError(f"`{' '.join(argv)}` failed: {last}")
