"""vhost-user-scsi: the virtio plumbing around the SCSI target (scsi_target.py).

Queues: 0 control (task management, asynchronous notification), 1 event, 2.. requests. QEMU
builds the config space itself (no PROTOCOL_F_CONFIG), has no inflight tracking for scsi in 7.2
and takes only NOTIFY_ON_EMPTY, INDIRECT_DESC, EVENT_IDX and SCSI_F_HOTPLUG from the back end;
it forwards the guest's whole feature set in SET_FEATURES, so bits it emulates itself
(SCSI_F_CHANGE, ANY_LAYOUT, RING_RESET) are tolerated there.

Event buffers are held until a LUN appears or disappears (admin socket); an event with no
buffer to carry it is dropped and the next buffer reports EVENTS_MISSED (as QEMU does), after
which Linux rescans the whole bus.
"""

from __future__ import annotations

import logging
import struct
from typing import Any, Callable

from lab.errors import LabError
from lab.vhost_user import DeviceBroken
from lab.vhost_user.admin import AdminSocket
from lab.vhost_user.device import Buffers, Completer, Device
from lab.vhost_user.protocol import bit
from lab.vhost_user.scsi_target import Response, ScsiTarget

log = logging.getLogger(__name__)

F_HOTPLUG, F_CHANGE = 1, 2
F_ANY_LAYOUT, F_RING_RESET = 27, 40

CONTROL_QUEUE, EVENT_QUEUE, FIRST_REQUEST_QUEUE = 0, 1, 2
MAX_REQUEST_QUEUES = 254  # vring indices are 8 bits on the vhost-user wire

CMD_REQ = struct.Struct("<8sQBBB32s")  # lun, tag, task_attr, prio, crn, cdb
CMD_RESP = struct.Struct("<IIHBB96s")  # sense_len, resid, status_qualifier, status, response, sense
TMF_REQ = struct.Struct("<II8sQ")  # type, subtype, lun, tag
AN_REQ = struct.Struct("<I8sI")  # type, lun, event_requested
AN_RESP = struct.Struct("<IB")  # event_actual, response
EVENT = struct.Struct("<I8sI")  # event, lun, reason
CTRL_TYPE = struct.Struct("<I")

T_TMF, T_AN_QUERY, T_AN_SUBSCRIBE = 0, 1, 2
T_NO_EVENT, T_TRANSPORT_RESET = 0, 1
EVENTS_MISSED = 0x80000000
REASON_RESCAN, REASON_REMOVED = 1, 2


def decode_lun(raw: bytes) -> tuple[int, int] | None:
    """(target, lun) of a virtio-scsi LUN field; None for an addressing this device does not route
    (not the single-level format, or a well-known / extended LUN)."""
    if raw[0] != 1:
        return None
    level = raw[2]
    if level and not 0x40 <= level < 0x80:
        return None
    return raw[1], (level & 0x3F) << 8 | raw[3]


def encode_lun(target: int, lun: int) -> bytes:
    return bytes([1, target, (0x40 | lun >> 8) if lun > 255 else 0, lun & 0xFF]) + bytes(4)


def parse_address(text: str) -> tuple[int, int]:
    """"T:L" -> (target, lun), with a one-line LabError for anything else."""
    try:
        target, lun = (int(part, 10) for part in text.split(":"))
    except ValueError:
        raise LabError(f"LUN address {text!r} is not TARGET:LUN (e.g. 0:1)") from None
    return target, lun


def _header(views: list[memoryview], size: int) -> bytes:
    first = views[0] if views else None
    return bytes(first[:size]) if first is not None and len(first) >= size else Buffers.gather(views, 0, size)


class ScsiDevice(Device):
    foreign_features = bit(F_CHANGE) | bit(F_ANY_LAYOUT) | bit(F_RING_RESET)

    def __init__(self, target: ScsiTarget, request_queues: int = 1, admin: str | None = None) -> None:
        if not 1 <= request_queues <= MAX_REQUEST_QUEUES:
            raise LabError(f"request queue count {request_queues} is outside 1..{MAX_REQUEST_QUEUES}")
        self.target = target
        self.num_queues = FIRST_REQUEST_QUEUE + request_queues
        self._completer: Completer | None = None
        self._missed = False
        self._admin = AdminSocket(admin, self._admin_command) if admin else None

    def features(self) -> int:
        return bit(F_HOTPLUG)

    def attach(self, completer: Completer | None) -> None:
        self._completer = completer
        self._missed = False  # a new driver scans the bus anyway

    def watch(self) -> list[tuple[Any, Callable[[], None]]]:
        return [(self._admin.fileobj, self._admin.service)] if self._admin else []

    def handle(self, queue: int, request: Buffers) -> int | None:
        if queue == CONTROL_QUEUE:
            return self._control(request)
        if queue == EVENT_QUEUE:
            return self._event_buffer(request)
        return self._command(request)

    # ---- request queues ------------------------------------------------------------------

    def _command(self, request: Buffers) -> int:
        readable, writable = request.readable, request.writable
        rtotal, wtotal = Buffers.total(readable), Buffers.total(writable)
        if rtotal < CMD_REQ.size:
            raise DeviceBroken(f"scsi cmd_req is {rtotal} bytes, needs {CMD_REQ.size}")
        if wtotal < CMD_RESP.size:
            raise DeviceBroken(f"scsi cmd_resp buffer is {wtotal} bytes, needs {CMD_RESP.size}")
        raw_lun, _tag, _attr, _prio, _crn, cdb = CMD_REQ.unpack(_header(readable, CMD_REQ.size))
        data_out = Buffers.slice(readable, CMD_REQ.size, rtotal - CMD_REQ.size)
        data_in = Buffers.slice(writable, CMD_RESP.size, wtotal - CMD_RESP.size)
        address = decode_lun(raw_lun)
        if address is None:
            response, status, sense, moved = Response.BAD_TARGET, 0, b"", 0
        else:
            outcome = self.target.execute(address[0], address[1], cdb, data_out, data_in)
            response, status, sense, moved = outcome.response, outcome.status, outcome.sense, outcome.transferred
        size = wtotal - CMD_RESP.size if data_in else rtotal - CMD_REQ.size
        Buffers.scatter(writable, 0, CMD_RESP.pack(len(sense), size - moved, 0, status, response, sense))
        return CMD_RESP.size + (moved if data_in else 0)

    # ---- control queue -------------------------------------------------------------------

    def _control(self, request: Buffers) -> int:
        readable, writable = request.readable, request.writable
        rtotal, wtotal = Buffers.total(readable), Buffers.total(writable)
        if rtotal < CTRL_TYPE.size:
            raise DeviceBroken(f"scsi control request is {rtotal} bytes, needs at least {CTRL_TYPE.size}")
        (kind,) = CTRL_TYPE.unpack(_header(readable, CTRL_TYPE.size))
        if kind == T_TMF:
            if rtotal < TMF_REQ.size or wtotal < 1:
                raise DeviceBroken(f"scsi TMF request/response of {rtotal}/{wtotal} bytes, needs {TMF_REQ.size}/1")
            _, function, raw_lun, _tag = TMF_REQ.unpack(_header(readable, TMF_REQ.size))
            address = decode_lun(raw_lun)
            response = (self.target.task_management(address[0], address[1], function)
                        if address is not None else Response.BAD_TARGET)
            return Buffers.scatter(writable, 0, bytes([response]))
        if kind in (T_AN_QUERY, T_AN_SUBSCRIBE):
            if rtotal < AN_REQ.size or wtotal < AN_RESP.size:
                raise DeviceBroken(
                    f"scsi AN request/response of {rtotal}/{wtotal} bytes, needs {AN_REQ.size}/{AN_RESP.size}")
            return Buffers.scatter(writable, 0, AN_RESP.pack(0, Response.OK))  # no event class supported
        log.warning("scsi control request of unknown type %d completed without a response", kind)
        return 0

    # ---- event queue ---------------------------------------------------------------------

    def _event_buffer(self, request: Buffers) -> int | None:
        if request.readable:
            raise DeviceBroken("scsi event buffer has device-readable descriptors")
        if Buffers.total(request.writable) < EVENT.size:
            raise DeviceBroken(f"scsi event buffer is {Buffers.total(request.writable)} bytes, needs {EVENT.size}")
        if not self._missed:
            return None
        self._missed = False
        return Buffers.scatter(request.writable, 0, EVENT.pack(T_NO_EVENT | EVENTS_MISSED, bytes(8), 0))

    def _report(self, event: bytes) -> None:
        delivered = self._completer is not None and self._completer.complete_held(
            EVENT_QUEUE, lambda buffers: Buffers.scatter(buffers.writable, 0, event))
        if not delivered:
            self._missed = True
            log.info("no event buffer: the event is dropped, the next buffer reports EVENTS_MISSED")

    # ---- admin ---------------------------------------------------------------------------

    def _admin_command(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        lun_text = request.get("lun")
        if not isinstance(lun_text, str):
            raise LabError('"lun" must be a string "TARGET:LUN"')
        target, lun = parse_address(lun_text)
        if op == "add-lun":
            path, read_only = request.get("file"), request.get("ro", False)
            if not isinstance(path, str) or not isinstance(read_only, bool):
                raise LabError('add-lun needs "file" (a path) and optionally "ro" (true/false)')
            self.target.add(target, lun, path, read_only)
            reason = REASON_RESCAN
        elif op == "remove-lun":
            self.target.remove(target, lun)
            reason = REASON_REMOVED
        else:
            raise LabError(f"unknown op {op!r} (add-lun, remove-lun)")
        log.info("%s %s", op, lun_text)
        self._report(EVENT.pack(T_TRANSPORT_RESET, encode_lun(target, lun), reason))
        return {}

    def flush(self) -> None:
        self.target.flush()

    def close(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        self.target.close()
