"""Our vhost-user-scsi back end through the host front end (lab.virtio.scsi over vhost-user).

One back-end process (`python -m lab backend scsi`) serves every test: target 0 has LUN 0
(writable) and LUN 3 (read-only), target 2 has only LUN 300, target 1 does not exist. Data is
stamped (lab.virtio.workload) and checked in the image files; every error path checks the
transport response, status, sense key and ASC.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import TIMEOUT, DaemonUnderTest, make_image, serving, wait_for

from lab.backends import SCSI_KIND, ScsiLun
from lab.virtio.scsi import (
    CHECK_CONDITION,
    CMD_REQ,
    CMD_RESP,
    GOOD,
    KEY_DATA_PROTECT,
    KEY_ILLEGAL_REQUEST,
    KEY_NOT_READY,
    REASON_REMOVED,
    REASON_RESCAN,
    S_BAD_TARGET,
    S_FAILURE,
    S_FUNCTION_COMPLETE,
    S_FUNCTION_REJECTED,
    S_INCORRECT_LUN,
    S_OK,
    S_OVERRUN,
    T_AN_QUERY,
    T_AN_SUBSCRIBE,
    T_NO_EVENT,
    T_TRANSPORT_RESET,
    TMF_ABORT_TASK,
    TMF_ABORT_TASK_SET,
    TMF_CLEAR_ACA,
    TMF_CLEAR_TASK_SET,
    TMF_I_T_NEXUS_RESET,
    TMF_LOGICAL_UNIT_RESET,
    TMF_QUERY_TASK,
    TMF_QUERY_TASK_SET,
    Result,
    ScsiHost,
    encode_lun,
    qemu_config,
)
from lab.virtio.transport import DmaBuffer
from lab.virtio.vhost_user import VhostUserTransport
from lab.virtio.workload import stamped, verify, verify_image

REPO = Path(__file__).resolve().parents[1]
BS = 4096
PER = BS // 512
SEED = 77
QUEUES = 2


@dataclass(kw_only=True)
class ScsiBackend(DaemonUnderTest):
    """`python -m lab backend scsi` with an admin socket."""

    admin: str

    def argv(self) -> list[str]:
        return super().argv() + ["--admin", self.admin]

    @property
    def disk(self) -> str:
        return self.luns[0].image

    @property
    def ro_disk(self) -> str:
        return self.luns[1].image

    def admin_command(self, command: dict | bytes) -> dict:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(self.admin)
            sock.sendall(command if isinstance(command, bytes) else json.dumps(command).encode() + b"\n")
            return json.loads(sock.makefile("rb").readline())


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScsiBackend]:
    tmp = tmp_path_factory.mktemp("scsi")
    luns = (
        ScsiLun(target=0, lun=0, image=make_image(tmp / "disk0.img", 64 << 20)),
        ScsiLun(target=0, lun=3, image=make_image(tmp / "ro.img", 8 << 20), read_only=True),
        ScsiLun(target=2, lun=300, image=make_image(tmp / "far.img", 8 << 20)),
    )
    daemon = ScsiBackend(kind=SCSI_KIND, socket=str(tmp / "scsi.sock"), admin=str(tmp / "admin.sock"),
                         log=tmp / "backend.log", queues=QUEUES, luns=luns)
    with serving(daemon):
        yield daemon


def open_host(backend: ScsiBackend, queues: int = 1) -> ScsiHost:
    transport = VhostUserTransport(backend.socket, mem_size=16 << 20, timeout=TIMEOUT, config=qemu_config(QUEUES))
    try:
        return ScsiHost(transport, num_queues=queues, timeout=TIMEOUT)
    except BaseException:
        transport.close()
        raise


@pytest.fixture
def host(backend: ScsiBackend) -> Iterator[ScsiHost]:
    h = open_host(backend)
    yield h
    h.close()
    backend.check_alive()


def cdb10(opcode: int, lba: int, count: int, flags: int = 0) -> bytes:
    return bytes([opcode, flags]) + lba.to_bytes(4, "big") + b"\0" + count.to_bytes(2, "big") + b"\0"


def cdb16(opcode: int, lba: int, count: int, flags: int = 0) -> bytes:
    return bytes([opcode, flags]) + lba.to_bytes(8, "big") + count.to_bytes(4, "big") + b"\0\0"


def cdb6(opcode: int, lba: int, count: int) -> bytes:
    return bytes([opcode]) + lba.to_bytes(3, "big") + bytes([count, 0])


def check(result: Result, key: int, asc: int, ascq: int = 0) -> None:
    assert (result.response, result.status) == (S_OK, CHECK_CONDITION), result
    assert result.sense is not None and result.sense_data[0] == 0x70  # fixed format
    assert (result.sense.key, result.sense.asc, result.sense.ascq) == (key, asc, ascq)


def good(result: Result) -> Result:
    assert (result.response, result.status) == (S_OK, GOOD), result
    return result


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


# ---- discovery -------------------------------------------------------------------------------


def test_scan_finds_every_disk(host: ScsiHost) -> None:
    disks = {(d.target, d.lun): d for d in host.scan(range(4))}
    assert sorted(disks) == [(0, 0), (0, 3), (2, 300)]
    assert (disks[0, 0].blocks, disks[0, 0].block_size) == ((64 << 20) // 512, 512)
    assert disks[0, 3].read_only and not disks[0, 0].read_only
    assert all(d.unmap for d in disks.values())


def test_standard_inquiry_and_allocation_length(host: ScsiHost) -> None:
    result = good(host.inquiry(0, 0, allocation=96))
    data = result.data
    assert len(data) == 36 and result.resid == 60
    assert data[0] == 0x00 and data[2] == 5 and data[3] & 0x0F == 2 and data[4] == 31
    assert data[8:16] == b"LAB     "
    short = good(host.inquiry(0, 0, allocation=5))
    assert short.data == data[:5] and short.resid == 0


def test_vpd_pages(host: ScsiHost) -> None:
    assert host.vpd_pages(0, 0) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    serial = good(host.inquiry(0, 0, 0x80)).data
    other = good(host.inquiry(0, 3, 0x80)).data
    assert serial[4:] and serial[4:] != other[4:]
    ident = good(host.inquiry(0, 0, 0x83)).data
    assert ident[1] == 0x83 and ident[5] == 0x01 and ident[4 + 4 + ident[7] + 1] == 0x03  # T10 id, then NAA
    limits = good(host.inquiry(0, 0, 0xB0)).data
    assert int.from_bytes(limits[2:4], "big") == 0x3C
    max_unmap, max_descriptors = struct.unpack(">II", limits[20:28])
    assert max_unmap > 0 and max_descriptors > 0 and limits[4] & 1  # WSNZ
    assert int.from_bytes(good(host.inquiry(0, 0, 0xB1)).data[4:6], "big") == 1  # non-rotating
    provisioning = good(host.inquiry(0, 0, 0xB2)).data
    assert provisioning[5] & 0xE0 == 0xE0 and provisioning[6] & 7 == 2
    check(host.inquiry(0, 0, 0x89), KEY_ILLEGAL_REQUEST, 0x24)
    check(host.command(0, 0, bytes([0x12, 0, 0x80, 0, 36, 0]), data_in=36), KEY_ILLEGAL_REQUEST, 0x24)


def test_absent_target_and_lun(host: ScsiHost) -> None:
    for target in (1, 200):
        assert host.inquiry(target, 0).response == S_BAD_TARGET
        assert host.test_unit_ready(target, 0).response == S_BAD_TARGET
    absent = good(host.inquiry(0, 1, allocation=36)).data
    assert absent[0] == 0x7F and absent[2] == 5  # qualifier 3, type 0x1f, still SPC-3
    assert good(host.inquiry(2, 0, allocation=36)).data[0] == 0x7F  # LUN 0 absent on target 2
    check(host.test_unit_ready(0, 1), KEY_ILLEGAL_REQUEST, 0x25)
    check(host.command(0, 1, cdb10(0x28, 0, 1), data_in=512), KEY_ILLEGAL_REQUEST, 0x25)
    sense = good(host.command(0, 1, bytes([0x03, 0, 0, 0, 18, 0]), data_in=18)).data
    assert sense[0] == 0x70 and sense[2] == KEY_ILLEGAL_REQUEST and sense[12] == 0x25
    # well-known LUN addressing is not routed, nor a LUN field without the leading 1
    assert raw_response(host, bytes([1, 0, 0xC1, 0x01]) + bytes(4), bytes(6)) == S_BAD_TARGET
    assert raw_response(host, bytes(8), bytes(6)) == S_BAD_TARGET


def raw_response(host: ScsiHost, lun: bytes, cdb: bytes) -> int:
    """The transport response to a command with a hand-made LUN field."""
    t = host.transport
    req, resp = t.alloc_dma(CMD_REQ.size), t.alloc_dma(CMD_RESP.size)
    try:
        CMD_REQ.pack_into(req.view, 0, lun, 0, 0, 0, 0, cdb.ljust(32, b"\0"))
        host.submit(2, [(req.addr, CMD_REQ.size)], [(resp.addr, CMD_RESP.size)])
        return ScsiHost.parse_response(bytes(resp.view), b"").response
    finally:
        t.free_dma(req)
        t.free_dma(resp)


def test_report_luns(host: ScsiHost) -> None:
    assert host.report_luns(0) == [0, 3]
    assert host.report_luns(2) == [300]  # asked through the absent LUN 0
    assert host.report_luns(0, select=2) == [0, 3]
    assert host.report_luns(0, select=1) == []  # no well-known logical units
    data = good(host.command(2, 0, bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0]), data_in=16)).data
    assert data == (8).to_bytes(4, "big") + bytes(4) + bytes([0x41, 0x2C]) + bytes(6)  # flat addressing, LUN 300
    truncated = good(host.command(0, 0, bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0]), data_in=16))
    assert int.from_bytes(truncated.data[:4], "big") == 16 and len(truncated.data) == 16  # list length kept
    check(host.command(0, 0, bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 0, 0]), data_in=15), KEY_ILLEGAL_REQUEST, 0x24)
    check(host.command(0, 0, bytes([0xA0, 0, 0x10, 0, 0, 0, 0, 0, 0, 64, 0, 0]), data_in=64), KEY_ILLEGAL_REQUEST, 0x24)


def test_read_capacity(host: ScsiHost) -> None:
    last, size = struct.unpack(">II", good(host.command(0, 3, bytes([0x25]) + bytes(9), data_in=8)).data)
    assert (last + 1, size) == ((8 << 20) // 512, 512)
    data = good(host.command(0, 0, bytes([0x9E, 0x10]) + bytes(8) + (32).to_bytes(4, "big") + bytes(2),
                             data_in=32)).data
    assert struct.unpack(">QI", data[:12]) == ((64 << 20) // 512 - 1, 512)
    assert data[14] & 0xC0 == 0xC0  # LBPME, LBPRZ
    check(host.command(0, 0, bytes([0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0]), data_in=8), KEY_ILLEGAL_REQUEST, 0x24)
    check(host.command(0, 0, bytes([0x9E, 0x11]) + bytes(14), data_in=32), KEY_ILLEGAL_REQUEST, 0x24)
    assert host.command(0, 0, bytes([0x25]) + bytes(9), data_in=4).response == S_OVERRUN


@pytest.mark.parametrize("ten", [False, True], ids=["6", "10"])
def test_mode_sense(host: ScsiHost, ten: bool) -> None:
    def sense(lun: int, page: int, dbd: bool = False, allocation: int = 255, control: int = 0) -> Result:
        flags = 0x08 if dbd else 0
        if ten:
            cdb = bytes([0x5A, flags, control << 6 | page, 0, 0, 0, 0]) + allocation.to_bytes(2, "big") + b"\0"
        else:
            cdb = bytes([0x1A, flags, control << 6 | page, 0, allocation, 0])
        return host.command(0, lun, cdb, data_in=allocation)

    header = 8 if ten else 4
    data = good(sense(0, 0x08)).data
    descriptor = int.from_bytes(data[6:8], "big") if ten else data[3]
    assert descriptor == 8 and struct.unpack(">I", data[header + 4 : header + 8])[0] & 0xFFFFFF == 512
    page = data[header + descriptor :]
    assert page[0] == 0x08 and page[1] == 0x12 and page[2] & 0x04  # caching, WCE
    length = int.from_bytes(data[:2], "big") + 2 if ten else data[0] + 1
    assert length == len(data)
    control_page = good(sense(0, 0x0A, dbd=True)).data[header:]
    assert control_page[:2] == bytes([0x0A, 0x0A]) and not control_page[2] & 0x04  # fixed sense format
    both = good(sense(0, 0x3F, dbd=True)).data[header:]
    assert [both[0], both[20]] == [0x08, 0x0A]
    device_specific = 3 if ten else 2
    assert good(sense(3, 0x3F)).data[device_specific] & 0x80  # write protected
    assert not good(sense(0, 0x3F)).data[device_specific] & 0x80
    assert good(sense(0, 0x3F, allocation=4)).data == good(sense(0, 0x3F)).data[:4]
    check(sense(0, 0x1C), KEY_ILLEGAL_REQUEST, 0x24)
    check(sense(0, 0x08, control=3), KEY_ILLEGAL_REQUEST, 0x39)
    assert good(sense(0, 0x08, control=1)).data  # changeable values: a page of zeros


# ---- data ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [6, 10, 16])
def test_read_write_stamped(host: ScsiHost, backend: ScsiBackend, size: int) -> None:
    lba = {6: 40, 10: 80, 16: 120}[size]
    build = {6: cdb6, 10: cdb10, 16: cdb16}[size]
    read_op, write_op = {6: (0x08, 0x0A), 10: (0x28, 0x2A), 16: (0x88, 0x8A)}[size]
    data = stamped(lba, 4, size, SEED)
    result = good(host.command(0, 0, build(write_op, lba * PER, 4 * PER), data_out=data))
    assert result.resid == 0
    back = good(host.command(0, 0, build(read_op, lba * PER, 4 * PER), data_in=len(data)))
    assert back.resid == 0 and verify(back.data, lba, size, SEED) == []
    good(host.command(0, 0, bytes([0x35]) + bytes(9)))
    assert verify_image(backend.disk, size, SEED, first_lba=lba, count=4) == []
    assert verify_image(backend.disk, None, SEED, first_lba=lba + 4, count=1) == []


def test_residuals_and_overrun(host: ScsiHost) -> None:
    host.write(0, 0, 160 * PER, stamped(160, 1, 1, SEED))
    bigger = good(host.command(0, 0, cdb10(0x28, 160 * PER, PER), data_in=BS + 1024))
    assert bigger.resid == 1024 and verify(bigger.data, 160, 1, SEED) == []
    extra_out = good(host.command(0, 0, cdb10(0x2A, 161 * PER, 1), data_out=bytes(1024)))
    assert extra_out.resid == 512
    assert host.command(0, 0, cdb10(0x28, 160 * PER, PER), data_in=BS - 512).response == S_OVERRUN
    assert host.command(0, 0, cdb10(0x2A, 160 * PER, PER), data_out=bytes(BS - 512)).response == S_OVERRUN
    assert host.command(0, 0, cdb10(0x28, 160 * PER, PER)).response == S_OVERRUN  # no data-in at all
    assert verify(host.read(0, 0, 160 * PER, PER), 160, 1, SEED) == []  # nothing was written
    empty = good(host.command(0, 0, cdb10(0x28, 0, 0)))
    assert empty.resid == 0


def test_out_of_range(host: ScsiHost) -> None:
    blocks = (64 << 20) // 512
    check(host.command(0, 0, cdb10(0x28, blocks, 1), data_in=512), KEY_ILLEGAL_REQUEST, 0x21)
    check(host.command(0, 0, cdb16(0x88, blocks - 1, 2), data_in=1024), KEY_ILLEGAL_REQUEST, 0x21)
    check(host.command(0, 0, cdb16(0x8A, 2**63, 1), data_out=bytes(512)), KEY_ILLEGAL_REQUEST, 0x21)
    check(host.command(0, 0, cdb16(0x91, blocks, 1)), KEY_ILLEGAL_REQUEST, 0x21)
    good(host.command(0, 0, cdb16(0x91, 0, 0)))
    good(host.command(0, 0, cdb10(0x28, blocks - 1, 1), data_in=512))
    good(host.command(0, 0, cdb10(0x28, blocks, 0)))  # zero blocks just past the end: no error


def test_read_only_lun_refuses_writes(host: ScsiHost, backend: ScsiBackend) -> None:
    writes = [
        (cdb10(0x2A, 0, 1), bytes(512)), (cdb16(0x8A, 0, 1), bytes(512)), (cdb6(0x0A, 0, 1), bytes(512)),
        (cdb10(0x41, 0, 8), bytes(512)), (bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]), unmap_list([(0, 8)])),
    ]
    for cdb, data in writes:
        check(host.command(0, 3, cdb, data_out=data), KEY_DATA_PROTECT, 0x27)
    assert good(host.command(0, 3, cdb10(0x28, 0, 1), data_in=512)).data == bytes(512)
    good(host.command(0, 3, bytes([0x35]) + bytes(9)))
    assert allocated(backend.ro_disk) == 0


def unmap_list(ranges: list[tuple[int, int]]) -> bytes:
    descriptors = b"".join(struct.pack(">QI4x", lba, count) for lba, count in ranges)
    return struct.pack(">HH4x", 6 + len(descriptors), len(descriptors)) + descriptors


def test_unmap_punches_holes(host: ScsiHost, backend: ScsiBackend) -> None:
    host.write(0, 0, 1024 * PER, stamped(1024, 256, 3, SEED))  # 1 MiB at 4 MiB
    host.write(0, 0, 2048 * PER, stamped(2048, 16, 3, SEED))
    host.synchronize_cache(0, 0)
    before = allocated(backend.disk)
    params = unmap_list([(1024 * PER, 128 * PER), (1152 * PER, 128 * PER), (2048 * PER, 8 * PER)])
    good(host.command(0, 0, bytes([0x42, 0, 0, 0, 0, 0, 0, 0, len(params), 0]), data_out=params))
    assert allocated(backend.disk) <= before - (1 << 20) - 8 * BS + BS
    expected = {lba: (None if lba < 2056 else 3) for lba in range(2048, 2064)}
    assert verify(host.read(0, 0, 2048 * PER, 16 * PER), 2048, expected, SEED) == []
    assert verify_image(backend.disk, None, SEED, first_lba=1024, count=256) == []
    good(host.command(0, 0, bytes([0x42]) + bytes(9)))  # empty parameter list: nothing to do
    check(host.command(0, 0, bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 4, 0]), data_out=bytes(4)), KEY_ILLEGAL_REQUEST, 0x1A)
    past = unmap_list([((64 << 20) // 512 - 1, 2)])
    check(host.command(0, 0, bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]), data_out=past), KEY_ILLEGAL_REQUEST, 0x21)
    many = unmap_list([(i, 1) for i in range(65)])
    cdb = bytes([0x42, 0, 0, 0, 0, 0, 0]) + len(many).to_bytes(2, "big") + b"\0"
    check(host.command(0, 0, cdb, data_out=many), KEY_ILLEGAL_REQUEST, 0x26)
    check(host.command(0, 0, bytes([0x42, 1, 0, 0, 0, 0, 0, 0, 24, 0]), data_out=params[:24]), KEY_ILLEGAL_REQUEST,
          0x24)
    assert host.command(0, 0, bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 40, 0]), data_out=params[:24]).response == S_OVERRUN


@pytest.mark.parametrize("sixteen", [False, True], ids=["10", "16"])
def test_write_same(host: ScsiHost, backend: ScsiBackend, sixteen: bool) -> None:
    base = 3000 if sixteen else 3100
    build, opcode = (cdb16, 0x93) if sixteen else (cdb10, 0x41)
    host.write(0, 0, base * PER, stamped(base, 64, 4, SEED))
    host.synchronize_cache(0, 0)
    pattern = bytes(range(256)) * 2
    good(host.command(0, 0, build(opcode, base * PER, 8 * PER), data_out=pattern))
    assert host.read(0, 0, base * PER, 8 * PER) == pattern * 8 * PER
    before = allocated(backend.disk)
    good(host.command(0, 0, build(opcode, (base + 8) * PER, 16 * PER), data_out=bytes(512)))  # zeros, kept
    assert allocated(backend.disk) >= before - BS
    good(host.command(0, 0, build(opcode, (base + 32) * PER, 32 * PER, flags=0x08), data_out=bytes(512)))  # UNMAP
    host.synchronize_cache(0, 0)
    assert allocated(backend.disk) <= before - 32 * BS + BS
    zeroed = set(range(base + 8, base + 24)) | set(range(base + 32, base + 64))
    expected = {lba: (None if lba in zeroed else 4) for lba in range(base + 8, base + 64)}
    assert verify(host.read(0, 0, (base + 8) * PER, 56 * PER), base + 8, expected, SEED) == []
    assert verify_image(backend.disk, expected, SEED, first_lba=base + 8, count=56) == []
    good(host.command(0, 0, build(opcode, (base + 24) * PER, 8 * PER, flags=0x08), data_out=pattern))  # data: written
    assert host.read(0, 0, (base + 24) * PER, PER) == pattern * PER
    if sixteen:  # NDOB: zeros without a data-out buffer
        good(host.command(0, 0, build(opcode, (base + 24) * PER, 8 * PER, flags=0x09)))
        assert host.read(0, 0, (base + 24) * PER, PER) == bytes(BS)
    check(host.command(0, 0, build(opcode, base * PER, 0), data_out=bytes(512)), KEY_ILLEGAL_REQUEST, 0x24)
    check(host.command(0, 0, build(opcode, (64 << 20) // 512 - 1, 2), data_out=bytes(512)), KEY_ILLEGAL_REQUEST, 0x21)
    check(host.command(0, 0, build(opcode, 0, 1, flags=0x02), data_out=bytes(512)), KEY_ILLEGAL_REQUEST, 0x24)
    assert host.command(0, 0, build(opcode, 0, 1), data_out=bytes(100)).response == S_OVERRUN


def test_start_stop_unit(host: ScsiHost) -> None:
    def start_stop(value: int) -> Result:
        return host.command(2, 300, bytes([0x1B, 0, 0, 0, value, 0]))

    good(host.test_unit_ready(2, 300))
    good(start_stop(0x00))  # stop
    check(host.test_unit_ready(2, 300), KEY_NOT_READY, 0x04, 0x02)
    check(host.command(2, 300, cdb10(0x28, 0, 1), data_in=512), KEY_NOT_READY, 0x04, 0x02)
    assert good(host.command(2, 300, bytes([0x03, 0, 0, 0, 18, 0]), data_in=18)).data[12:14] == bytes([0x04, 0x02])
    good(host.inquiry(2, 300))  # still answers
    good(start_stop(0x01))
    good(host.test_unit_ready(2, 300))
    good(start_stop(0x02))  # unload
    check(host.test_unit_ready(2, 300), KEY_NOT_READY, 0x3A)
    check(host.command(2, 300, bytes([0x25]) + bytes(9), data_in=8), KEY_NOT_READY, 0x3A)
    good(start_stop(0x03))  # load and start
    good(host.test_unit_ready(2, 300))
    check(start_stop(0x10), KEY_ILLEGAL_REQUEST, 0x24)  # power conditions


def test_report_supported_operation_codes(host: ScsiHost) -> None:
    def rsoc(options: int, opcode: int = 0, action: int = 0, allocation: int = 1024) -> Result:
        cdb = bytes([0xA3, 0x0C, options, opcode]) + action.to_bytes(2, "big") + allocation.to_bytes(4, "big")
        cdb += bytes(2)
        return host.command(0, 0, cdb, data_in=allocation)

    one = good(rsoc(1, 0x93)).data
    assert one[1] & 7 == 3 and int.from_bytes(one[2:4], "big") == 16 and one[4] == 0x93 and len(one) == 20
    assert good(rsoc(1, 0xC0)).data[1] & 7 == 1  # not supported
    assert good(rsoc(2, 0x9E, 0x10)).data[4:6] == bytes([0x9E, 0x1F])
    check(rsoc(1, 0x9E), KEY_ILLEGAL_REQUEST, 0x24)  # has service actions
    check(rsoc(2, 0x28), KEY_ILLEGAL_REQUEST, 0x24)  # has none
    check(rsoc(5), KEY_ILLEGAL_REQUEST, 0x24)
    everything = good(rsoc(0)).data
    length = int.from_bytes(everything[:4], "big")
    opcodes = {everything[4 + i] for i in range(0, length, 8)}
    assert {0x00, 0x12, 0x28, 0x2A, 0x42, 0x93, 0x9E, 0xA0, 0xA3} <= opcodes


def test_invalid_commands(host: ScsiHost) -> None:
    check(host.command(0, 0, bytes([0xC0]) + bytes(5)), KEY_ILLEGAL_REQUEST, 0x20)
    check(host.command(0, 0, bytes([0x04]) + bytes(5)), KEY_ILLEGAL_REQUEST, 0x20)  # FORMAT UNIT
    check(host.command(0, 0, bytes([0, 0, 0, 0, 0, 0x04])), KEY_ILLEGAL_REQUEST, 0x24)  # NACA
    check(host.command(0, 0, bytes([0x03, 1, 0, 0, 18, 0]), data_in=18), KEY_ILLEGAL_REQUEST, 0x24)  # DESC
    check(host.command(0, 0, cdb10(0x28, 0, 1, flags=0x20), data_in=512), KEY_ILLEGAL_REQUEST, 0x24)  # RDPROTECT
    field = host.command(0, 0, bytes([0x12, 0, 0x80, 0, 36, 0]), data_in=36)
    assert field.sense_data[15] == 0xC0 and field.sense_data[16:18] == bytes([0, 2])  # points at byte 2
    assert good(host.command(0, 0, bytes([0x03, 0, 0, 0, 18, 0]), data_in=18)).data[2] == 0  # NO SENSE


# ---- control and event queues ----------------------------------------------------------------


def test_task_management(host: ScsiHost) -> None:
    for function in (TMF_ABORT_TASK, TMF_ABORT_TASK_SET, TMF_CLEAR_TASK_SET, TMF_LOGICAL_UNIT_RESET,
                     TMF_I_T_NEXUS_RESET, TMF_QUERY_TASK, TMF_QUERY_TASK_SET):
        assert host.tmf(function, 0, 0, tag=7) == S_FUNCTION_COMPLETE, function
        assert host.tmf(function, 1, 0) == S_BAD_TARGET, function
    assert host.tmf(TMF_LOGICAL_UNIT_RESET, 0, 1) == S_INCORRECT_LUN
    assert host.tmf(TMF_QUERY_TASK, 0, 1) == S_INCORRECT_LUN
    assert host.tmf(TMF_I_T_NEXUS_RESET, 2, 0) == S_FUNCTION_COMPLETE
    assert host.tmf(TMF_CLEAR_ACA, 0, 0) == S_FUNCTION_REJECTED
    assert host.tmf(42, 0, 0) == S_FUNCTION_REJECTED
    assert host.async_notification(T_AN_QUERY, 0, 0, 0xFFFF) == (0, S_OK)
    assert host.async_notification(T_AN_SUBSCRIBE, 0, 0, 0x2) == (0, S_OK)
    good(host.test_unit_ready(0, 0))


def test_hotplug_events(host: ScsiHost, backend: ScsiBackend, tmp_path: Path) -> None:
    image = make_image(tmp_path / "hot.img", 1 << 20)
    host.post_event_buffers(4)
    assert host.events(0.05) == []  # buffers are held, not completed
    assert backend.admin_command({"op": "add-lun", "lun": "0:9", "file": image}) == {"ok": True}
    [event] = host.events(TIMEOUT)
    assert (event.kind, event.missed, event.reason, event.address) == (T_TRANSPORT_RESET, False, REASON_RESCAN, (0, 9))
    assert event.lun == encode_lun(0, 9)
    assert host.report_luns(0) == [0, 3, 9]
    host.write(0, 9, 8, stamped(1, 1, 9, SEED))
    host.synchronize_cache(0, 9)
    assert verify_image(image, 9, SEED, first_lba=1, count=1) == []
    assert backend.admin_command({"op": "add-lun", "lun": "7:0", "file": image, "ro": True}) == {"ok": True}
    assert host.events(TIMEOUT)[0].address == (7, 0)
    assert host.scan([7])[0].read_only
    for lun in ("0:9", "7:0"):
        assert backend.admin_command({"op": "remove-lun", "lun": lun}) == {"ok": True}
        [event] = host.events(TIMEOUT)
        assert (event.kind, event.reason) == (T_TRANSPORT_RESET, REASON_REMOVED)
    assert host.inquiry(7, 0).response == S_BAD_TARGET
    check(host.test_unit_ready(0, 9), KEY_ILLEGAL_REQUEST, 0x25)


def test_events_missed_without_buffers(backend: ScsiBackend, tmp_path: Path) -> None:
    image = make_image(tmp_path / "late.img", 1 << 20)
    host = open_host(backend)
    try:
        assert backend.admin_command({"op": "add-lun", "lun": "0:20", "file": image})["ok"]
        assert backend.admin_command({"op": "remove-lun", "lun": "0:20"})["ok"]
        host.post_event_buffers(2)
        [event] = host.events(TIMEOUT)
        assert event.missed and event.kind == T_NO_EVENT
        assert host.events(0.05) == []  # reported once
    finally:
        host.close()


def test_held_event_buffers_are_handed_back_at_stop(backend: ScsiBackend) -> None:
    host = open_host(backend)
    try:
        host.post_event_buffers(3)
        host.events(0.05)
        bases = host.transport._stop()  # what QEMU does at vm stop: GET_VRING_BASE per ring
        assert bases[1] == 0  # the three held buffers are available again, not lost
    finally:
        host.close()


@pytest.mark.parametrize(
    "command, error",
    [
        ({"op": "add-lun", "lun": "0:0", "file": "x"}, "already in use"),
        ({"op": "add-lun", "lun": "0:30", "file": "/nonexistent.img"}, "cannot open image"),
        ({"op": "add-lun", "lun": "zero", "file": "x"}, "TARGET:LUN"),
        ({"op": "remove-lun", "lun": "0:31"}, "does not exist"),
        ({"op": "explode", "lun": "0:1"}, "unknown op"),
        (b"{not json\n", "not JSON"),
        (b"[1, 2]\n", "JSON object"),
    ],
)
def test_admin_errors(backend: ScsiBackend, command, error: str) -> None:
    reply = backend.admin_command(command)
    assert reply["ok"] is False and error in reply["error"]
    backend.check_alive()


# ---- multi-queue and hostile requests --------------------------------------------------------


def test_request_queues(backend: ScsiBackend) -> None:
    host = open_host(backend, queues=2)
    try:
        host.write(0, 0, 4000 * PER, stamped(4000, 2, 1, SEED), queue=1)
        assert verify(host.read(0, 0, 4000 * PER, 2 * PER, queue=0), 4000, 1, SEED) == []
    finally:
        host.close()


def test_split_headers_and_indirect(host: ScsiHost) -> None:
    t = host.transport
    req, resp, data = t.alloc_dma(CMD_REQ.size), t.alloc_dma(CMD_RESP.size), t.alloc_dma(BS)
    try:
        host.write(0, 0, 4100 * PER, stamped(4100, 1, 2, SEED))
        CMD_REQ.pack_into(req.view, 0, encode_lun(0, 0), 1, 0, 0, 0, cdb10(0x28, 4100 * PER, PER).ljust(32, b"\0"))
        for indirect in (False, True):
            data.view[:] = bytes(BS)
            writable = [(resp.addr, 10), (resp.addr + 10, 98), (data.addr, 1000), (data.addr + 1000, BS - 1000)]
            used = host.submit(2, [(req.addr, 3), (req.addr + 3, 20), (req.addr + 23, 28)], writable, indirect)
            result = ScsiHost.parse_response(bytes(resp.view), bytes(data.view))
            assert good(result).resid == 0 and used == CMD_RESP.size + BS
            assert verify(result.data, 4100, 2, SEED) == []
    finally:
        for buffer in (req, resp, data):
            t.free_dma(buffer)


def test_bidirectional_is_refused(host: ScsiHost) -> None:
    t = host.transport
    req, resp, buf = t.alloc_dma(CMD_REQ.size), t.alloc_dma(CMD_RESP.size), t.alloc_dma(1024)
    try:
        CMD_REQ.pack_into(req.view, 0, encode_lun(0, 0), 1, 0, 0, 0, cdb10(0x28, 0, 1).ljust(32, b"\0"))
        host.submit(2, [(req.addr, CMD_REQ.size), (buf.addr, 512)], [(resp.addr, CMD_RESP.size), (buf.addr + 512, 512)])
        assert ScsiHost.parse_response(bytes(resp.view), b"").response == S_FAILURE
    finally:
        for buffer in (req, resp, buf):
            t.free_dma(buffer)


def _chain(host: ScsiHost, buf: DmaBuffer, queue: int, buffers: list[tuple[int, int, bool]]) -> None:
    """One chain on virtqueue `queue` of (offset in buf, length, device-writable) buffers."""
    q = host.queues[queue]
    q.start(1, len(buffers))
    for offset, length, writable in buffers:
        q.add(buf.addr + offset, length, writable)
    q.flush()


def _valid_cmd_req(buf: DmaBuffer) -> None:
    CMD_REQ.pack_into(buf.view, 0, encode_lun(0, 0), 1, 0, 0, 0, bytes(32))


MALFORMED: dict[str, Callable[[ScsiHost, DmaBuffer], None]] = {
    "cmd_req too short": lambda h, b: _chain(h, b, 2, [(0, CMD_REQ.size - 1, False), (256, CMD_RESP.size, True)]),
    "cmd_resp too small": lambda h, b: (
        _valid_cmd_req(b), _chain(h, b, 2, [(0, CMD_REQ.size, False), (256, CMD_RESP.size - 1, True)])),
    "tmf request too short": lambda h, b: _chain(h, b, 0, [(0, 20, False), (256, 1, True)]),
    "control type cut off": lambda h, b: _chain(h, b, 0, [(0, 3, False), (256, 1, True)]),
    "event buffer too small": lambda h, b: _chain(h, b, 1, [(0, 15, True)]),
    "readable event buffer": lambda h, b: _chain(h, b, 1, [(0, 16, False), (256, 16, True)]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_breaks_only_this_connection(backend: ScsiBackend, case: str) -> None:
    before = len(backend.broken_lines())
    host = open_host(backend)
    try:
        buf = host.transport.alloc_dma(4096)
        MALFORMED[case](host, buf)
        wait_for(lambda: len(backend.broken_lines()) > before, "the 'device broken' log line")
        assert len(backend.broken_lines()) == before + 1
    finally:
        host.transport.close()  # the back end closed the connection: no orderly reset
    backend.check_alive()
    fresh = open_host(backend)
    try:
        fresh.write(0, 0, 4200 * PER, stamped(4200, 1, 5, SEED))
        assert verify(fresh.read(0, 0, 4200 * PER, PER), 4200, 5, SEED) == []
    finally:
        fresh.close()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lun", "0:0"], "expected TARGET:LUN=FILE[,ro]"),
        (["--lun", "a:b=x.img"], "is not TARGET:LUN"),
        (["--lun", "0:0=/nonexistent.img"], "cannot open image /nonexistent.img"),
        (["--lun", "0:0={img}", "--lun", "0:0={img}"], "already in use"),
        (["--lun", "0:0={img},rw"], "not option 'rw'"),
        (["--lun", "256:0={img}"], "outside targets"),
        (["--lun", "0:0={img}", "--queues", "0"], "outside 1..254"),
    ],
)
def test_cli_errors_are_one_line(tmp_path: Path, argv: list[str], message: str) -> None:
    image = tmp_path / "x.img"
    image.write_bytes(bytes(4096))
    argv = [a.format(img=image) for a in argv]
    command = [sys.executable, "-m", "lab", "backend", "scsi", "--socket", str(tmp_path / "s.sock"), *argv]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and message in done.stderr and "Traceback" not in done.stderr
