"""The guest image recipe: everything that decides the image's content, as data, in one place.

`recipe_hash()` names the cached image; any change here, in a file of images/guest or in
BUILDER_FORMAT changes the hash and so causes a rebuild.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from images import GUEST_GW, GUEST_IP, READY_MARKER, ROOT_SERIAL

# Bump when images/builder.py changes what it produces from the same recipe.
BUILDER_FORMAT = 1

SUITE = "bookworm"
KERNEL_METAPACKAGE = "linux-image-amd64"

# Installed on top of mmdebstrap's minbase variant (Recommends are not installed).
ROOTFS_PACKAGES: tuple[str, ...] = (
    "python3",
    "openssh-server",
    "fio",
    "sg3-utils",
    "util-linux",
    "mount",
    "iproute2",
    "kmod",
    "procps",
    "e2fsprogs",
    "pciutils",
)

# Never installed into the rootfs: documentation and translations (dpkg path-exclude globs).
ROOTFS_EXCLUDES: tuple[str, ...] = (
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/lintian/*",
)

# Mounting the root: loaded by the initramfs /init in this order (dependencies first, as
# busybox insmod does not resolve them).
# - virtio_rng is not needed for the root, but loaded this early it seeds the kernel's RNG from
#   a virtio-rng device, if the machine has one, before sshd needs it (otherwise sshd waits
#   a second or two for jitter entropy under TCG).
# - crc32c_generic is no declared dependency of ext4, but ext4 and jbd2 ask the crypto API for
#   "crc32c" at mount time, and the initramfs has no modprobe to load it on demand.
INITRAMFS_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_rng",
    "virtio_blk",
    "crc16",
    "mbcache",
    "jbd2",
    "crc32c_generic",
    "ext4",
    "overlay",
)

# Loaded by the rootfs init before the guest reports ready: there is no udev in the guest, so
# nothing loads drivers for devices later; these are the ones the lab's devices need at boot.
# The generic CRC algorithms come first: loaded, they satisfy sd_mod's (t10-pi's) crypto lookups;
# missing, each lookup spawns the kernel's modprobe helper, which costs most of a second.
BOOT_MODULES: tuple[str, ...] = (
    "crct10dif_generic",
    "crc64_rocksoft_generic",
    "virtio_net",
    "virtio_scsi",
    "sd_mod",
    "sg",
)

# Installed in the rootfs (with their dependencies) for tests to `modprobe` when they need them.
ON_DEMAND_MODULES: tuple[str, ...] = (
    "vfio",
    "vfio_pci",
    "vfio_iommu_type1",
    "uio",
    "uio_pci_generic",
)

# Free space left in the ext4 root beyond its content (the root is mounted read-only with a
# tmpfs overlay, so this only matters for tools that inspect it).
ROOTFS_FREE_MIB = 64
HOSTNAME = "lab-guest"

# Base kernel command line; the initramfs and rootfs init need nothing from it.
# quiet: printing to the 8250 console is slow under TCG.
# mitigations=off, cryptomgr.notests: less work at boot for a throwaway test guest.
CMDLINE = "console=ttyS0 quiet panic=-1 mitigations=off cryptomgr.notests"

GUEST_DIR = Path(__file__).resolve().parent / "guest"


GuestFiles = dict[str, bytes]


def guest_files() -> GuestFiles:
    """Content of every file under images/guest, by path relative to it."""
    return {
        str(p.relative_to(GUEST_DIR)): p.read_bytes()
        for p in sorted(GUEST_DIR.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def render(content: bytes) -> bytes:
    """A guest file as installed: @NAME@ replaced by the value of NAME in substitutions()."""
    text = content.decode()
    for key, value in substitutions().items():
        text = text.replace(f"@{key}@", value)
    return text.encode()


def substitutions() -> dict[str, str]:
    """Values the builder puts in place of @NAME@ in the guest files."""
    return {
        "ROOT_SERIAL": ROOT_SERIAL,
        "READY_MARKER": READY_MARKER,
        "GUEST_IP": GUEST_IP,
        "GUEST_GW": GUEST_GW,
        "HOSTNAME": HOSTNAME,
        "INITRAMFS_MODULES": " ".join(INITRAMFS_MODULES),
        "BOOT_MODULES": " ".join(BOOT_MODULES),
    }


def rootfs_base_data() -> dict[str, object]:
    """What decides the package set: the key of the cached mmdebstrap tarball."""
    return {
        "suite": SUITE,
        "packages": list(ROOTFS_PACKAGES),
        "excludes": list(ROOTFS_EXCLUDES),
        "builder_format": BUILDER_FORMAT,
    }


def recipe_data() -> dict[str, object]:
    return {
        **rootfs_base_data(),
        "kernel_metapackage": KERNEL_METAPACKAGE,
        "initramfs_modules": list(INITRAMFS_MODULES),
        "boot_modules": list(BOOT_MODULES),
        "on_demand_modules": list(ON_DEMAND_MODULES),
        "rootfs_free_mib": ROOTFS_FREE_MIB,
        "cmdline": CMDLINE,
        "substitutions": substitutions(),
    }


def _digest(data: dict[str, object], files: GuestFiles) -> str:
    h = hashlib.sha256(json.dumps(data, sort_keys=True).encode())
    for name, content in sorted(files.items()):
        h.update(f"\0{name}\0{len(content)}\0".encode())
        h.update(content)
    return h.hexdigest()


def recipe_hash(files: GuestFiles | None = None) -> str:
    """Names the image: the recipe data, the guest files' content and the builder format.

    Pass the `guest_files()` a build uses so that the name matches exactly what it installs.
    """
    return _digest(recipe_data(), guest_files() if files is None else files)


def rootfs_base_hash() -> str:
    return _digest(rootfs_base_data(), {})
