"""A guest's vhost-user-scsi-pci served by our back end, side by side with QEMU's own scsi-hd.

One boot carries two SCSI controllers with the same layout: target 0 has LUN 0 (64 MiB) and
LUN 1 (32 MiB, read-only, stamped), target 1 has LUN 0 (48 MiB). On the vhost-user-scsi one our
back end answers; on the virtio-scsi-pci one QEMU's scsi-hd does. Checks on ours: sizes as the
guest sees them, INQUIRY / VPD / READ CAPACITY answers, fio random writes verified on each
writable LUN, stamped blocks and discards seen in the images on the host, device and target
resets in the middle of I/O, writes refused by the read-only LUN with DATA PROTECT. Then a fixed
list of commands goes to both controllers and the answers must agree in the fields that matter.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import re
import struct
import time
from pathlib import Path

import pytest

from fixtures.scsi import ServedScsi
from lab.backends import ScsiLun
from lab.guest import fio, stamps
from lab.guest.ssh import GuestSSH
from lab.guest.stamps import StampWrite
from lab.qemu.machine import ScsiHd, create_raw_image, virtio_scsi_disks
from lab.virtio.workload import stamped, verify_image

pytestmark = [pytest.mark.scsi, pytest.mark.boot]

MiB = 1 << 20
BLOCK = stamps.BLOCK
SECTOR = 512
SEED = 0x5C51
QUEUES = 2
RO = (0, 1)
SIZES_MIB = {(0, 0): 64, RO: 32, (1, 0): 48}
RO_STAMPED_BLOCKS = 256
OURS, QEMU = "LAB", "QEMU"  # INQUIRY vendor of each controller's disks
KEY_ILLEGAL_REQUEST, KEY_DATA_PROTECT = 0x5, 0x7

# Layout of the writable LUNs: fio verify in [0, 16M) of each; on 0:0 the reset workload
# (rate-limited fio in [16M, 32M), stamps in [32M, 48M)); on 1:0 stamps in [16M, 32M) with a
# discard in the middle.
FIO_MIB = 16
RESET_FIO = {"offset": "16M", "size": "16M", "rate_iops": 1500}
RESET_STAMP = StampWrite(32 * MiB // BLOCK, 2048, 3, stride=2)
DISCARD_STAMP = StampWrite(16 * MiB // BLOCK, 16 * MiB // BLOCK, 4)
DISCARD = (20 * MiB, 4 * MiB)  # byte offset, length
RESET_SECONDS = 120.0


@dataclasses.dataclass(frozen=True)
class GuestLun:
    """A SCSI disk as the guest sees it."""

    hctl: str  # host:channel:target:lun
    block: str  # /dev/sdX
    sg: str  # /dev/sgN

    @property
    def name(self) -> str:
        return Path(self.block).name


@dataclasses.dataclass(frozen=True)
class Sense:
    key: int
    asc: int
    ascq: int


def test_scsi_luns(scsi_backend_factory, machine_factory, test_dir: Path) -> None:
    images = {"ours": {}, "qemu": {}}
    for side in images:
        for (target, lun), mib in SIZES_MIB.items():
            path = test_dir / f"{side}-{target}-{lun}.img"
            if (target, lun) == RO:
                path.write_bytes(stamped(0, RO_STAMPED_BLOCKS, 1, SEED).ljust(mib * MiB, b"\0"))
            else:
                create_raw_image(path, mib)
            images[side][target, lun] = path
    scsi = scsi_backend_factory(
        [ScsiLun(t, l, str(path), read_only=(t, l) == RO) for (t, l), path in images["ours"].items()], queues=QUEUES
    )
    builtin = [
        ScsiHd(t, l, path, read_only=(t, l) == RO, serial=f"qemu-{t}-{l}") for (t, l), path in images["qemu"].items()
    ]
    vm = machine_factory(mem_mib=768, options=[*scsi.options(), *virtio_scsi_disks("qscsi", builtin, QUEUES)])

    luns = find_luns(vm.ssh)
    ours = {address: luns[OURS, address] for address in SIZES_MIB}
    check_sizes(vm.ssh, ours)
    check_identity(vm.ssh, ours)
    check_fio_verify(vm.ssh, [ours[a] for a in SIZES_MIB if a != RO])
    stamps.install(vm.ssh)
    check_resets_mid_io(vm.ssh, ours[0, 0], scsi, images["ours"][0, 0])
    check_discard(vm.ssh, ours[1, 0], images["ours"][1, 0])
    check_read_only(vm.ssh, ours[RO], images["ours"][RO])
    check_same_answers(vm.ssh, ours, {address: luns[QEMU, address] for address in SIZES_MIB})


# ---- guest-side helpers ----------------------------------------------------------------------


def find_luns(ssh: GuestSSH) -> dict[tuple[str, tuple[int, int]], GuestLun]:
    """Every SCSI disk in the guest by (INQUIRY vendor, (target, lun)); exactly the configured
    ones on each controller (nothing at absent addresses)."""
    listing = ssh.run(
        "for d in /sys/bus/scsi/devices/*:*:*:*; do "
        'echo "${d##*/} $(cat $d/vendor) $(ls $d/block) $(ls $d/scsi_generic)"; done'
    ).stdout
    found = {}
    for line in listing.splitlines():
        hctl, vendor, block, sg = line.split()
        target, lun = (int(part) for part in hctl.split(":")[2:])
        found[vendor, (target, lun)] = GuestLun(hctl, f"/dev/{block}", f"/dev/{sg}")
    assert sorted(found) == sorted((v, a) for v in (OURS, QEMU) for a in SIZES_MIB), listing
    for vendor in (OURS, QEMU):
        hosts = {found[vendor, a].hctl.split(":")[0] for a in SIZES_MIB}
        assert len(hosts) == 1, f"{vendor} disks on several SCSI hosts: {listing}"
    return found


def raw(ssh: GuestSSH, command: str) -> bytes:
    """The binary output of an sg3_utils command run with --raw."""
    out = ssh.run(f"{command} > /tmp/sg.bin && od -An -v -tx1 /tmp/sg.bin").stdout
    return bytes.fromhex("".join(out.split()))


def inquiry(ssh: GuestSSH, lun: GuestLun) -> bytes:
    return raw(ssh, f"sg_inq --raw {lun.sg}")


def vpd(ssh: GuestSSH, lun: GuestLun, page: int) -> bytes:
    data = raw(ssh, f"sg_vpd --raw -p {page:#04x} {lun.sg}")
    assert data[1] == page and len(data) == 4 + struct.unpack_from(">H", data, 2)[0], data.hex()
    return data[4:]


def capacity16(ssh: GuestSSH, lun: GuestLun) -> tuple[int, int, int]:
    """(blocks, block size, LBPME|LBPRZ byte) from READ CAPACITY(16)."""
    last, size, flags = struct.unpack_from(">QIxxB", raw(ssh, f"sg_readcap -l --raw {lun.sg}"))
    return last + 1, size, flags


def sense_of(ssh: GuestSSH, lun: GuestLun, cdb: str, sg_raw_options: str = "") -> Sense:
    """Send `cdb` (hex bytes) with sg_raw and return the sense it got (it must be CHECK CONDITION)."""
    result = ssh.run(f"sg_raw -v {sg_raw_options} {lun.sg} {cdb}", check=False)
    text = result.stdout + result.stderr
    assert "Check Condition" in text, f"{cdb} on {lun.hctl}: no CHECK CONDITION:\n{text}"
    match = re.search(r"Raw sense data.*\n((?:\s+(?:[0-9a-f]{2}\s*)+\n?)+)", text)
    assert match, f"{cdb} on {lun.hctl}: no raw sense data in:\n{text}"
    data = bytes.fromhex("".join(match.group(1).split()))
    if data[0] & 0x7F in (0x72, 0x73):  # descriptor format
        return Sense(data[1] & 0x0F, data[2], data[3])
    return Sense(data[2] & 0x0F, data[12], data[13])


# ---- checks on our back end --------------------------------------------------------------------


def check_sizes(ssh: GuestSSH, ours: dict[tuple[int, int], GuestLun]) -> None:
    for address, lun in ours.items():
        size, ro = SIZES_MIB[address] * MiB, int(address == RO)
        disk = f"/sys/class/scsi_disk/{lun.hctl}"
        assert ssh.run(f"readlink -f {disk}/device/block/{lun.name}").stdout.strip().endswith(lun.name)
        assert int(ssh.run(f"cat /sys/block/{lun.name}/size").stdout) * SECTOR == size, lun
        assert ssh.run(f"lsblk -bndo SIZE,RO {lun.block}").stdout.split() == [str(size), str(ro)], lun
        if not ro:
            assert ssh.run(f"cat {disk}/provisioning_mode").stdout.strip() == "unmap", lun


def check_identity(ssh: GuestSSH, ours: dict[tuple[int, int], GuestLun]) -> None:
    """INQUIRY, VPD pages and READ CAPACITY(16) of each LUN, decoded from sg3_utils' raw output."""
    serials, naas = set(), set()
    for address, lun in ours.items():
        data = inquiry(ssh, lun)
        assert data[0] == 0x00, f"{lun.hctl}: peripheral qualifier/type {data[0]:#x}"  # a connected disk
        assert data[2] >= 0x05, f"{lun.hctl}: version {data[2]:#x}, Linux needs SPC-3 to read VPD"
        assert data[8:16].decode().strip() == OURS and data[16:32].decode().strip() == "VHOST-USER DISK"

        assert list(vpd(ssh, lun, 0x00)) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2], lun
        serial = vpd(ssh, lun, 0x80).decode("ascii").strip()
        assert serial, lun
        serials.add(serial)
        designators = parse_designators(vpd(ssh, lun, 0x83))
        assert 3 in designators, f"{lun.hctl}: no NAA designator in VPD 0x83: {designators}"
        naas.add(designators[3])
        max_transfer, _, _, max_unmap, max_descriptors, granularity = struct.unpack_from(">IIIIII", vpd(ssh, lun, 0xB0), 4)
        assert max_transfer > 0 and max_unmap > 0 and max_descriptors > 0 and granularity * SECTOR == BLOCK, lun
        assert vpd(ssh, lun, 0xB2)[1] & 0xE0 == 0xE0, f"{lun.hctl}: VPD 0xb2 lacks LBPU/LBPWS/LBPWS10"

        blocks, block_size, flags = capacity16(ssh, lun)
        assert (blocks * block_size, block_size) == (SIZES_MIB[address] * MiB, SECTOR), lun
        assert flags & 0x80, f"{lun.hctl}: READ CAPACITY(16) without LBPME"
        # sg_readcap's decoded view agrees with the raw bytes
        decoded = ssh.run(f"sg_readcap -l {lun.sg}").stdout
        assert f"Number of logical blocks={blocks}" in decoded and "lbpme=1" in decoded, decoded
    assert len(serials) == len(naas) == len(ours), f"serials {serials}, NAA designators {naas} not unique"


def parse_designators(page: bytes) -> dict[int, bytes]:
    """Designator type -> designator of a VPD 0x83 page body."""
    found, offset = {}, 0
    while offset + 4 <= len(page):
        length = page[offset + 3]
        found[page[offset + 1] & 0x0F] = page[offset + 4 : offset + 4 + length]
        offset += 4 + length
    return found


def check_fio_verify(ssh: GuestSSH, luns: list[GuestLun]) -> None:
    """Random 4 KiB writes at depth 16 on every writable LUN at once, then read and verified."""
    jobs = {
        lun.name: {
            "filename": lun.block, "rw": "randwrite", "bs": "4k", "size": f"{FIO_MIB}M", "iodepth": 16,
            "direct": 1, "ioengine": "libaio", "verify": "crc32c", "verify_fatal": 1,
        }
        for lun in luns
    }
    report = fio.run(ssh, jobs, timeout=300)
    for lun in luns:
        result = report.job(lun.name)
        assert result.write_iops > 0 and result.read_iops > 0, result  # read: the verify pass


def check_resets_mid_io(ssh: GuestSSH, lun: GuestLun, scsi: ServedScsi, image: Path) -> None:
    """LOGICAL UNIT RESET (sg_reset -d) and a target reset request (sg_reset -t), over and over
    while fio (verify) and our stamped writes run on the LUN: both finish, nothing is lost.

    Linux's virtio_scsi has no target reset handler: the SCSI midlayer refuses `sg_reset -t`
    (escalating to bus and host reset, which it has no handlers for either) before anything
    reaches the device; it must fail that way without disturbing the I/O."""
    job = {"filename": lun.block, "rw": "randwrite", "bs": "4k", "iodepth": 16, "direct": 1, "ioengine": "libaio",
           "verify": "crc32c", "verify_fatal": 1, **RESET_FIO}
    resets_in_flight = 0
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        writers = [
            pool.submit(fio.run, ssh, {"reset-fio": job}, timeout=RESET_SECONDS),
            pool.submit(stamps.write, ssh, lun.block, RESET_STAMP, SEED, timeout=RESET_SECONDS),
        ]
        deadline = time.monotonic() + RESET_SECONDS
        while not all(w.done() for w in writers):
            assert time.monotonic() < deadline, "fio/stamp writes did not finish around the resets"
            device = ssh.run(f"sg_reset -d {lun.sg}", check=False)
            assert device.exit_status == 0, f"device reset failed: {device.stderr}"
            target = ssh.run(f"sg_reset -t {lun.sg}", check=False)
            assert target.exit_status != 0 and "may not be available" in target.stderr, target
            resets_in_flight += not any(w.done() for w in writers)
            scsi.backend.check_alive()
            time.sleep(0.2)
        for writer in writers:
            writer.result()  # raises what went wrong: a fio error/verify failure, a failed stamp write
    assert resets_in_flight >= 2, f"only {resets_in_flight} reset rounds while both writers ran: lengthen them"
    dmesg = ssh.run(f"dmesg | grep '{lun.hctl}'").stdout
    assert "device reset" in dmesg, dmesg
    assert not re.search(r"timing out|abort|offlin|rejecting I/O", dmesg), dmesg
    region = RESET_STAMP.lbas()
    mismatches = verify_image(image, stamps.expected([RESET_STAMP]), SEED, first_lba=region.start, count=len(region))
    assert not mismatches, "\n".join(map(str, mismatches[:10]))


def check_discard(ssh: GuestSSH, lun: GuestLun, image: Path) -> None:
    """Stamps written, a range discarded: the image has a hole there, zeros, intact neighbours."""
    stamps.write(ssh, lun.block, DISCARD_STAMP, SEED)
    offset, length = DISCARD
    ssh.run(f"blkdiscard -o {offset} -l {length} {lun.block} && sync")
    region = DISCARD_STAMP.lbas()
    cleared = [range(offset // BLOCK, (offset + length) // BLOCK)]
    expected = stamps.expected([DISCARD_STAMP], cleared)
    mismatches = verify_image(image, expected, SEED, first_lba=region.start, count=len(region))
    assert not mismatches, "\n".join(map(str, mismatches[:10]))
    with open(image, "rb") as f:
        assert os.lseek(f.fileno(), offset, os.SEEK_DATA) >= offset + length, "discarded range still allocated"
        assert os.lseek(f.fileno(), offset - BLOCK, os.SEEK_HOLE) == offset, "the hole is not the discarded range"


def check_read_only(ssh: GuestSSH, lun: GuestLun, image: Path) -> None:
    """WRITE(10) through sg_raw gets DATA PROTECT / WRITE PROTECTED; data reads back; image unchanged."""
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    sense = sense_of(ssh, lun, "2a 00 00 00 00 00 00 00 08 00", "-s 4096 -i /dev/urandom")
    assert (sense.key, sense.asc) == (KEY_DATA_PROTECT, 0x27), sense
    nbytes = RO_STAMPED_BLOCKS * BLOCK
    read = ssh.run(f"dd if={lun.block} bs={nbytes} count=1 iflag=direct status=none | sha256sum").stdout.split()[0]
    assert read == hashlib.sha256(image.read_bytes()[:nbytes]).hexdigest()
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before, "read-only image changed"


# ---- side by side with QEMU's scsi-hd ----------------------------------------------------------


def answers(ssh: GuestSSH, lun: GuestLun, address: tuple[int, int]) -> dict[str, object]:
    """The fields that must agree between two disks of the same size and flags."""
    blocks, block_size, flags = capacity16(ssh, lun)
    limits = struct.unpack_from(">II", vpd(ssh, lun, 0xB0), 16)  # max unmap LBA count, descriptors
    facts: dict[str, object] = {
        "inquiry peripheral byte": inquiry(ssh, lun)[0],
        "capacity16 blocks": blocks,
        "capacity16 block size": block_size,
        "capacity16 LBPME": bool(flags & 0x80),
        "VPD 0x00 pages": list(vpd(ssh, lun, 0x00)),
        "VPD 0xb0 unmap limits present": all(limits),
        "invalid opcode sense": sense_of(ssh, lun, "ff 00 00 00 00 00"),
        "READ(16) past the end sense": sense_of(
            ssh, lun, "88 00 " + " ".join(f"{b:02x}" for b in blocks.to_bytes(8, "big")) + " 00 00 00 01 00 00",
            "-r 512",
        ),
    }
    if address == RO:
        facts["WRITE(10) to read-only sense"] = sense_of(ssh, lun, "2a 00 00 00 00 00 00 00 01 00", "-s 512 -i /dev/zero")
    return facts


def check_same_answers(
    ssh: GuestSSH, ours: dict[tuple[int, int], GuestLun], qemu: dict[tuple[int, int], GuestLun]
) -> None:
    for address in SIZES_MIB:
        mine, theirs = answers(ssh, ours[address], address), answers(ssh, qemu[address], address)
        differ = {key: (mine[key], theirs[key]) for key in mine if mine[key] != theirs[key]}
        assert not differ, f"LUN {address}: ours vs QEMU's scsi-hd differ (ours, qemu): {differ}"
        # agreeing is not enough: both must also be right
        senses = {key: (s.key, s.asc) for key, s in mine.items() if isinstance(s, Sense)}
        assert senses.pop("invalid opcode sense") == (KEY_ILLEGAL_REQUEST, 0x20), mine
        assert senses.pop("READ(16) past the end sense") == (KEY_ILLEGAL_REQUEST, 0x21), mine
        assert set(senses.values()) <= {(KEY_DATA_PROTECT, 0x27)}, mine
        assert mine["inquiry peripheral byte"] == 0 and mine["VPD 0xb0 unmap limits present"], mine
