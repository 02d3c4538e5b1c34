"""Stamped blocks (lab.virtio.workload) written from inside a guest with O_DIRECT.

The guest gets a copy of lab/virtio (standard library only, relative imports) over SFTP and
writes with it; the host then checks the raw image with verify_image(). Data is bit-exact
only if it crossed the whole path (guest kernel, virtio ring, back end, image file) intact.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Iterable
from pathlib import Path

from lab.guest.ssh import GuestSSH

GUEST_DIR = "/root/lab-stamps"
PACKAGE = "labvirtio"  # the guest's name for lab/virtio
VIRTIO_SOURCES = Path(__file__).resolve().parents[1] / "virtio"
BLOCK = 4096
_RUN_BLOCKS = 256  # contiguous blocks per pwrite

# Runs in the guest as `python3 -m labvirtio.stampwrite DEV FIRST COUNT GEN SEED STRIDE BLOCK`.
_WRITER = f'''
import mmap, os, sys
from .workload import fill

def main():
    device = sys.argv[1]
    first, count, generation, seed, stride, block = (int(a) for a in sys.argv[2:8])
    run = {_RUN_BLOCKS} if stride == 1 else 1
    buf = mmap.mmap(-1, run * block)  # page aligned, as O_DIRECT needs
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        done = 0
        while done < count:
            n = min(run, count - done)
            lba = first + done * stride
            with memoryview(buf)[: n * block] as view:
                fill(view, lba, generation, seed, block)
                if os.pwrite(fd, view, lba * block) != n * block:
                    sys.exit(f"short write at block {{lba}}")
            done += n
        os.fsync(fd)
    finally:
        os.close(fd)

main()
'''


@dataclasses.dataclass(frozen=True)
class StampWrite:
    """Blocks first_lba, first_lba + stride, ... (count of them) stamped with `generation`."""

    first_lba: int
    count: int
    generation: int
    stride: int = 1

    def lbas(self) -> range:
        return range(self.first_lba, self.first_lba + self.count * self.stride, self.stride)


def install(ssh: GuestSSH) -> None:
    """Copy lab/virtio and the writer into the guest (idempotent)."""
    package = f"{GUEST_DIR}/{PACKAGE}"
    ssh.run(f"mkdir -p {package}")
    for source in sorted(VIRTIO_SOURCES.glob("*.py")):
        ssh.put(source, f"{package}/{source.name}")
    ssh.run(f"cat > {package}/stampwrite.py <<'EOF'\n{_WRITER}\nEOF")


def write(ssh: GuestSSH, device: str, stamp: StampWrite, seed: int, timeout: float = 300.0) -> None:
    """Write `stamp` to the guest's `device` and fsync it (a virtio flush reaches the back end)."""
    ssh.run(write_command(device, stamp, seed), timeout=timeout)


def write_command(device: str, stamp: StampWrite, seed: int) -> str:
    """The guest shell command that writes `stamp` (for callers that run it in the background)."""
    args = [device, stamp.first_lba, stamp.count, stamp.generation, seed, stamp.stride, BLOCK]
    return f"cd {GUEST_DIR} && python3 -m {PACKAGE}.stampwrite {shlex.join(map(str, args))}"


def expected(writes: Iterable[StampWrite], cleared: Iterable[range] = ()) -> dict[int, int | None]:
    """The generation each block must hold after `writes` in order, then `cleared` lba ranges
    (discarded or zeroed: None, must read as zeros). Blocks absent must read as zeros too."""
    generations: dict[int, int | None] = {}
    for stamp in writes:
        generations.update(dict.fromkeys(stamp.lbas(), stamp.generation))
    for lbas in cleared:
        generations.update(dict.fromkeys(lbas, None))
    return generations
