"""Our userspace virtio-pci driver inside a guest, on four kinds of device in one boot.

One guest carries, at known PCI addresses, vhost-user-blk-pci, vhost-user-scsi-pci, QEMU's
virtio-blk-pci and virtio-scsi-pci: our back end's devices and QEMU's own (the reference). On each, the
driver (the labvirtio.pyz zipapp, run as a process in the guest) takes the device from the
kernel and writes stamped blocks over a span from two queues, then runs random read/write with
verification on two queues for two passes with a device reset and re-initialisation between
them. The host's image must hold exactly the stamps the driver reported writing; the guest's
kernel driver, rebound afterwards, must read the same bytes. A buffer layout that crosses
hugepage boundaries exercises split buffers. Then the refusals: a legacy-only device, a device
whose queue size is not a power of two, the mounted root disk, an absent device, a non-root user.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from fixtures.guest_driver import DRIVER_MACHINE
from lab.backends import ScsiLun
from lab.guest.driver import GuestDriver
from lab.qemu.machine import (
    ScsiHd, at_pci_slot, create_raw_image, device, image_blockdev, pci_address, virtio_blk_disk,
    virtio_scsi_disks,
)
from lab.virtio.engine import IoReport
from lab.virtio.workload import stamped, verify_image

pytestmark = [pytest.mark.driver, pytest.mark.boot]

MiB = 1 << 20
BLOCK = 4096
SEED = 0xD21
DISK_MIB = 64
QUEUES = 2
SPAN = range(1024, 1024 + 2048)  # 8 MiB of 4 KiB blocks from 4 MiB on
RANDRW_SECONDS = 3
SPLIT_BS = 192 << 10  # not a divisor of 2 MiB: some buffers straddle two hugepages
SPLIT_SPAN = range(32 * MiB // SPLIT_BS + 1, 32 * MiB // SPLIT_BS + 1 + 64)
SLOTS = {"vhost-user-blk": 0x10, "vhost-user-scsi": 0x11, "virtio-blk": 0x12, "virtio-scsi": 0x13}
LEGACY_SLOT, BAD_QUEUE_SLOT = 0x14, 0x15
KERNEL_DEVICE_SECONDS = 30.0


KINDS = ("vhost-user-blk", "virtio-blk", "vhost-user-scsi", "virtio-scsi")


def test_userspace_driver(backend_factory, scsi_backend_factory, machine_factory, guest_driver, test_dir: Path) -> None:
    images = {kind: create_raw_image(test_dir / f"{kind}.img", DISK_MIB) for kind in KINDS}
    served = {
        "vhost-user-blk": lambda: backend_factory("ours", "vu0", image=images["vhost-user-blk"], queues=QUEUES).options(),
        "vhost-user-scsi": lambda: scsi_backend_factory(
            [ScsiLun(0, 0, str(images["vhost-user-scsi"]))], queues=QUEUES
        ).options(),
        "virtio-blk": lambda: virtio_blk_disk("qblk", images["virtio-blk"], "qblk"),
        "virtio-scsi": lambda: virtio_scsi_disks("qscsi", [ScsiHd(0, 0, images["virtio-scsi"])], QUEUES),
    }
    options = [opt for kind in KINDS for opt in at_pci_slot(served[kind](), SLOTS[kind])]
    legacy = [image_blockdev("legacy", create_raw_image(test_dir / "legacy.img", 4)),
              device("virtio-blk-pci", {"disable-modern": True, "disable-legacy": False}, drive="legacy")]
    bad_queue = [device("virtio-scsi-pci", virtqueue_size=100)]
    options += at_pci_slot(legacy, LEGACY_SLOT) + at_pci_slot(bad_queue, BAD_QUEUE_SLOT)
    vm = machine_factory(options=options, **DRIVER_MACHINE)
    driver = guest_driver(vm)

    listed = {entry.bdf: entry for entry in driver.list()}
    for kind in KINDS:
        assert listed[pci_address(SLOTS[kind])].kind == kind.rsplit("-", 1)[1], listed
        assert listed[pci_address(SLOTS[kind])].driver == "virtio-pci"

    for kind in KINDS:
        check_device(driver, pci_address(SLOTS[kind]), images[kind], kind)
    check_split_buffers(driver, pci_address(SLOTS["vhost-user-blk"]), images["vhost-user-blk"])
    check_refusals(driver)


def check_device(driver: GuestDriver, bdf: str, image: Path, kind: str) -> None:
    fill = driver.io(bdf, rw="write", bs=BLOCK, qd=16, queues=QUEUES, ios=len(SPAN), first_block=SPAN.start,
                     blocks=len(SPAN), generation=1, seed=SEED, verify=True)
    assert_clean(fill, kind)
    assert fill.written == [[SPAN.start, len(SPAN)]], f"{kind}: the fill wrote {fill.written}"

    mixed = driver.io(bdf, rw="randrw", bs=BLOCK, qd=32, queues=QUEUES, seconds=RANDRW_SECONDS, passes=2,
                      first_block=SPAN.start, blocks=len(SPAN), generation=2, prior=1, seed=SEED, verify=True)
    assert_clean(mixed, kind)
    assert mixed.passes == 2
    assert mixed.verify_checked > 100, f"{kind}: only {mixed.verify_checked} reads verified"
    assert all(n > 0 for n in mixed.per_queue), f"{kind}: completions per queue {mixed.per_queue}"

    expected = dict.fromkeys(SPAN, 1)
    for first, count in mixed.written:
        expected.update(dict.fromkeys(range(first, first + count), 2))
    assert len(expected) == len(SPAN)
    mismatches = verify_image(image, expected, SEED, block_size=BLOCK)
    assert not mismatches, f"{kind} image:\n" + "\n".join(map(str, mismatches[:10]))

    dev = kernel_block_device(driver, bdf)
    want = hashlib.sha256(b"".join(stamped(lba, 1, expected[lba], SEED) for lba in SPAN)).hexdigest()
    got = driver.ssh.run(
        f"dd if={dev} bs={BLOCK} skip={SPAN.start} count={len(SPAN)} iflag=direct status=none | sha256sum"
    ).stdout.split()[0]
    assert got == want, f"{kind}: the kernel driver reads other data from {dev} than the userspace driver wrote"


def assert_clean(report: IoReport, kind: str) -> None:
    assert report.errors == 0 and report.verify_errors == 0, (
        f"{kind} {report.rw}: {report.errors} errors, {report.verify_errors} bad blocks: {report.mismatches}"
    )


def kernel_block_device(driver: GuestDriver, bdf: str) -> str:
    """The kernel's block device of `bdf` once its driver is back (a scsi scan takes a moment)."""
    deadline = time.monotonic() + KERNEL_DEVICE_SECONDS
    while True:
        entry = {e.bdf: e for e in driver.list()}[bdf]
        if entry.driver == "virtio-pci" and entry.block:
            return f"/dev/{entry.block[0]}"
        assert time.monotonic() < deadline, f"{bdf}: no kernel block device after {KERNEL_DEVICE_SECONDS}s: {entry}"
        time.sleep(0.5)


def check_split_buffers(driver: GuestDriver, bdf: str, image: Path) -> None:
    """192 KiB buffers, 16 of them: 3 MiB of data crosses hugepage boundaries, and where two
    hugepages are not physically adjacent (usual, not certain) a buffer goes out in pieces."""
    report = driver.io(bdf, rw="randrw", bs=SPLIT_BS, qd=16, seconds=2, first_block=SPLIT_SPAN.start,
                       blocks=len(SPLIT_SPAN), generation=1, prior=0, seed=SEED, verify=True)
    assert_clean(report, "split buffers")
    assert report.verify_checked > 0
    assert report.split_buffers > 0 or report.dma_extents == 1, report
    written = {lba for first, count in report.written for lba in range(first, first + count)}
    mismatches = verify_image(image, lambda lba: 1 if lba in written else None, SEED, block_size=SPLIT_BS,
                              first_lba=SPLIT_SPAN.start, count=len(SPLIT_SPAN))
    assert not mismatches, "\n".join(map(str, mismatches[:10]))


def check_refusals(driver: GuestDriver) -> None:
    refusals = {
        ("info", pci_address(LEGACY_SLOT)): "legacy-only",
        ("info", pci_address(BAD_QUEUE_SLOT)): "not a power of two",
        ("info", pci_address(1)): "is in use: /dev/vda is mounted",
        ("info", pci_address(0x1E)): "no PCI device at",
        ("io", pci_address(SLOTS["virtio-blk"]), "--ios", "10", "--blocks", "8"): "too small",
    }
    for args, message in refusals.items():
        error = driver.error(list(args))
        assert message in error and "\n" not in error, f"{args}: {error!r}"
    # refused devices are given back to the kernel (or never taken from it)
    for slot in (LEGACY_SLOT, BAD_QUEUE_SLOT):
        assert {e.bdf: e for e in driver.list()}[pci_address(slot)].driver == "virtio-pci"

    unprivileged = driver.ssh.run(
        f"cp {driver.path} /tmp/lv.pyz && setpriv --reuid=65534 --regid=65534 --clear-groups "
        f"python3 /tmp/lv.pyz info {pci_address(SLOTS['virtio-blk'])}", check=False,
    )
    assert unprivileged.exit_status == 1 and "must run as root" in unprivileged.stderr, unprivileged
