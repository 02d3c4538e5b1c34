"""A guest's vhost-user-blk disks served by a back end process: ours, and QSD as the reference.

One guest per back end kind carries two served disks (a writable one with 2 queues and a
read-only one) and runs every check on them in turn: identity (size, serial, queues), fio
random writes verified with several jobs, our stamped blocks written in the guest and verified
in the host's image, discard and write-zeroes seen in the image, an ext4 filesystem whose files
are read back on the host, and writes refused by the read-only disk.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from fixtures.backend import ServedDisk
from lab.backends import BACKEND_KINDS
from lab.guest import fio, stamps
from lab.guest.ssh import GuestSSH
from lab.guest.stamps import StampWrite
from lab.virtio.workload import stamped, verify_image

pytestmark = [pytest.mark.blk, pytest.mark.boot]

MiB = 1 << 20
BLOCK = stamps.BLOCK
SEED = 0x5EED
QUEUES = 2
DISK_MIB = 64
RO_DISK_MIB = 32  # a different size from the writable disk tells the two apart for QSD (same serial)
RO_STAMPED_BLOCKS = 256

# Writable disk layout: fio's two jobs in [0, 32M), our stamps in [32M, 48M), zeros above.
FIO_JOB_MIB = 16
STAMPS = (StampWrite(32 * MiB // BLOCK, 16 * MiB // BLOCK, 1), StampWrite(32 * MiB // BLOCK, 585, 2, stride=7))
DISCARD = (36 * MiB, 4 * MiB)  # byte offset, length: inside the stamped range
WRITE_ZEROES = (42 * MiB, 2 * MiB)
FILES = {"/big": "bs=1M count=6", "/dir/small": "bs=4k count=33", "/dir/sub/odd": "bs=1 count=12345"}


@pytest.fixture(params=BACKEND_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def test_served_disks(kind: str, backend_factory, machine_factory, test_dir: Path) -> None:
    disk = backend_factory(kind, "vu0", size_mib=DISK_MIB, queues=QUEUES)
    ro_image = test_dir / "ro.img"
    ro_image.write_bytes(stamped(0, RO_STAMPED_BLOCKS, 1, SEED).ljust(RO_DISK_MIB * MiB, b"\0"))
    ro_disk = backend_factory(kind, "vu1", image=ro_image, queues=1, read_only=True)
    vm = machine_factory(mem_mib=512, options=[*disk.options(), *ro_disk.options()])

    dev = find_disk(vm.ssh, disk)
    check_identity(vm.ssh, dev, disk)
    check_fio_verify(vm.ssh, dev)
    check_stamps_discard_and_zeroes(vm.ssh, dev, disk)
    check_filesystem(vm.ssh, dev, disk, test_dir)
    check_read_only(vm.ssh, find_disk(vm.ssh, ro_disk), ro_disk)


def find_disk(ssh: GuestSSH, disk: ServedDisk) -> str:
    """The guest's /dev path for `disk`: the virtio disk with its serial and size."""
    listing = ssh.run(
        'for d in /sys/block/vd*; do echo "${d##*/} $(cat $d/size) $(cat $d/serial)"; done'
    ).stdout
    found = [
        f"/dev/{name}"
        for name, sectors, *serial in (line.split(" ", 2) for line in listing.splitlines())
        if int(sectors) == disk.sectors and serial == [disk.serial]
    ]
    assert len(found) == 1, (
        f"want one disk of {disk.sectors} sectors with serial {disk.serial!r}; guest has:\n{listing}"
    )
    return found[0]


def check_identity(ssh: GuestSSH, dev: str, disk: ServedDisk) -> None:
    sysfs = f"/sys/block/{Path(dev).name}"
    assert int(ssh.run(f"cat {sysfs}/size").stdout) * 512 == DISK_MIB * MiB
    assert ssh.run(f"lsblk -bndo SIZE {dev}").stdout.strip() == str(DISK_MIB * MiB)
    assert ssh.run(f"cat {sysfs}/serial").stdout.strip() == disk.serial
    queues = ssh.run(f"ls {sysfs}/mq").stdout.split()
    assert sorted(queues) == [str(q) for q in range(QUEUES)], f"blk-mq hardware queues: {queues}"
    assert ssh.run(f"cat {sysfs}/ro").stdout.strip() == "0"


def check_fio_verify(ssh: GuestSSH, dev: str) -> None:
    """Two jobs, each on its own 16 MiB, random 4 KiB writes at depth 16, then read and verified."""
    job = {
        "filename": dev,
        "rw": "randwrite",
        "bs": "4k",
        "size": f"{FIO_JOB_MIB}M",
        "offset_increment": f"{FIO_JOB_MIB}M",
        "numjobs": 2,
        "iodepth": 16,
        "direct": 1,
        "ioengine": "libaio",
        "verify": "crc32c",
        "verify_fatal": 1,
    }
    report = fio.run(ssh, {"randwrite-verify": job}, timeout=300)
    assert len(report.jobs) == 2
    for result in report.jobs:
        assert result.write_iops > 0 and result.read_iops > 0, result  # read: the verify pass


def check_stamps_discard_and_zeroes(ssh: GuestSSH, dev: str, disk: ServedDisk) -> None:
    """Stamped blocks written in the guest are bit-exact in the image; discarded and zeroed
    ranges read as zeros there (the discarded one is a hole) and their neighbours are intact."""
    stamps.install(ssh)
    for stamp in STAMPS:
        stamps.write(ssh, dev, stamp, SEED)
    region = range(STAMPS[0].first_lba, DISK_MIB * MiB // BLOCK)  # the stamps and the zeros above
    assert not verify_image(disk.image, stamps.expected(STAMPS), SEED, first_lba=region.start, count=len(region))

    (d_off, d_len), (z_off, z_len) = DISCARD, WRITE_ZEROES
    ssh.run(f"blkdiscard -o {d_off} -l {d_len} {dev} && blkdiscard -z -o {z_off} -l {z_len} {dev} && sync")
    cleared = [range(off // BLOCK, (off + n) // BLOCK) for off, n in (DISCARD, WRITE_ZEROES)]
    mismatches = verify_image(
        disk.image, stamps.expected(STAMPS, cleared), SEED, first_lba=region.start, count=len(region)
    )
    assert not mismatches, "\n".join(map(str, mismatches[:10]))
    with open(disk.image, "rb") as image:
        next_data = os.lseek(image.fileno(), d_off, os.SEEK_DATA)
    assert next_data >= d_off + d_len, f"discarded range still allocated at {next_data}"


def check_filesystem(ssh: GuestSSH, dev: str, disk: ServedDisk, test_dir: Path) -> None:
    """ext4 made and filled in the guest, unmounted, then read on the host with e2fsprogs."""
    script = [f"mkfs.ext4 -q -F {dev}", f"mount {dev} /mnt", "mkdir -p /mnt/dir/sub"]
    script += [f"dd if=/dev/urandom of=/mnt{path} {size} status=none" for path, size in FILES.items()]
    script += [f"sha256sum {' '.join('/mnt' + p for p in FILES)}", "umount /mnt"]
    out = ssh.run(" && ".join(script), timeout=120).stdout
    guest_sums = {path.removeprefix("/mnt"): digest for digest, path in (l.split() for l in out.splitlines())}
    assert guest_sums.keys() == FILES.keys()

    fsck = subprocess.run(["e2fsck", "-fn", str(disk.image)], capture_output=True, text=True, timeout=60)
    assert fsck.returncode == 0, f"host fsck of the guest's filesystem:\n{fsck.stdout}{fsck.stderr}"
    for path, digest in guest_sums.items():
        local = test_dir / f"fs{path.replace('/', '_')}"
        dump = subprocess.run(
            ["debugfs", "-R", f"dump {path} {local}", str(disk.image)], capture_output=True, text=True, timeout=60
        )
        assert local.is_file(), f"debugfs could not dump {path}: {dump.stderr}"
        assert hashlib.sha256(local.read_bytes()).hexdigest() == digest, f"{path} differs on the host"


def check_read_only(ssh: GuestSSH, dev: str, disk: ServedDisk) -> None:
    """The guest sees a read-only disk, reads its data, and cannot change the image."""
    before = hashlib.sha256(disk.image.read_bytes()).hexdigest()
    name = Path(dev).name
    assert ssh.run(f"cat /sys/block/{name}/ro").stdout.strip() == "1"
    nbytes = RO_STAMPED_BLOCKS * BLOCK
    read = ssh.run(f"dd if={dev} bs={nbytes} count=1 iflag=direct status=none | sha256sum").stdout.split()[0]
    assert read == hashlib.sha256(disk.image.read_bytes()[:nbytes]).hexdigest()

    # The guest kernel honours VIRTIO_BLK_F_RO and refuses with EPERM before any request is
    # sent; EIO would mean the request reached the back end and it refused. (The back ends'
    # own refusal is checked without a guest in tests/test_blk_frontend.py.)
    write = ssh.run(f"dd if=/dev/zero of={dev} bs=4k count=1 oflag=direct", check=False)
    assert write.exit_status != 0, "a write to the read-only disk succeeded"
    assert "Operation not permitted" in write.stderr or "Input/output error" in write.stderr, write.stderr
    assert hashlib.sha256(disk.image.read_bytes()).hexdigest() == before, "read-only image changed"
