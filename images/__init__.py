"""Guest image: recipe (one list of everything the guest needs) and builder.

The contract with the rest of the lab is `ImageInfo`, returned by `images.builder.ensure_image`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    recipe_hash: str
    kernel: Path  # uncompressed ELF vmlinux: PVH direct boot (fast under TCG)
    initrd: Path  # busybox initramfs: loads modules, mounts the root read-only + tmpfs overlay
    rootfs: Path  # raw ext4 image; attach read-only as virtio-blk with serial ROOT_SERIAL
    key: Path  # SSH private key for root (public key baked into the rootfs)
    cmdline: str  # base kernel command line; callers may append
    kernel_version: str

    def to_json(self) -> dict:
        return {k: str(v) for k, v in dataclasses.asdict(self).items()}


ROOT_SERIAL = "labroot"
READY_MARKER = "LAB-GUEST-READY"
# user-mode network: the guest configures itself statically (no DHCP wait)
GUEST_IP = "10.0.2.15"
GUEST_GW = "10.0.2.2"
