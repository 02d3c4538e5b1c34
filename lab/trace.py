"""vhost-user message traces (a back end's --trace, JSON lines): read, pretty-print, replay.

Replay plays the front end's side of a recorded session against a fresh back end: every
recorded incoming message is encoded again from its decoded form and sent with new file
descriptors of the recorded kinds (memory regions as memfds of the recorded sizes, eventfds,
the inflight fd the new back end handed out), and every reply is compared with the recording.

The trace holds the control plane only: the guest's requests live in guest memory, which it does
not record, so a replayed ring never moves. Where the recorded GET_VRING_BASE shows ring
progress, the replay therefore expects the base the ring was started at (and says so in a note).
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import socket
import struct
from pathlib import Path
from typing import Any

from lab.errors import LabError
from lab.vhost_user import protocol
from lab.vhost_user.protocol import Request
from lab.virtio.vhost_user import BackendClosed, BackendTimeout, ProtocolError, VhostUserConnection

REPLY_SECONDS = 5.0
VIRTIO_BLK_F_RO = 5


@dataclasses.dataclass(frozen=True)
class Entry:
    line: int
    t: float
    direction: str  # "in": front end -> back end; "out": the back end's reply
    request: str
    flags: int
    payload: Any
    fds: list[dict]


def read(path: Path | str) -> list[Entry]:
    path = Path(path)
    entries = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise LabError(f"cannot read trace {path}: {exc.strerror}") from None
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            raw = json.loads(text)
            entries.append(Entry(number, float(raw["t"]), raw["dir"], raw["request"], int(raw["flags"]),
                                 raw.get("payload"), list(raw.get("fds") or [])))
        except (ValueError, KeyError, TypeError):
            raise LabError(f"{path}:{number}: not a vhost-user trace entry") from None
        if entries[-1].direction not in ("in", "out"):
            raise LabError(f"{path}:{number}: direction {entries[-1].direction!r} is neither in nor out")
    if not entries:
        raise LabError(f"{path}: empty trace")
    return entries


# -- show ----------------------------------------------------------------------------------------

def _value(key: str, value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and key in ("desc", "used", "avail", "log", "gpa",
                                                                          "uaddr", "offset", "features"):
        return f"{value:#x}"
    return str(value)


def format_payload(request: str, payload: Any) -> str:
    if payload is None:
        return ""
    if isinstance(payload, int):
        return f"{payload:#x}" if "FEATURES" in request else str(payload)
    if isinstance(payload, str):
        return f"raw {payload[:64]}{'...' if len(payload) > 64 else ''}"
    if isinstance(payload, dict) and "regions" in payload:
        return "; ".join(
            f"region gpa={r['gpa']:#x} size={r['size']:#x} uaddr={r['uaddr']:#x} offset={r['offset']:#x}"
            for r in payload["regions"]
        )
    if isinstance(payload, dict):
        return " ".join(f"{k}={_value(k, v) if k != 'data' else (v[:48] + ('...' if len(v) > 48 else ''))}"
                        for k, v in payload.items())
    return str(payload)


def format_fds(fds: list[dict]) -> str:
    described = []
    for fd in fds:
        kind = fd.get("fd", "?")
        described.append(f"{kind} {fd['size']} B" if "size" in fd else kind)
    return f"  [fds: {', '.join(described)}]" if described else ""


def show(entries: list[Entry]) -> list[str]:
    """One line per message: time since the first, direction, request, decoded payload, fds."""
    start = entries[0].t
    lines = []
    for e in entries:
        arrow = "->" if e.direction == "in" else "<-"
        flags = " NEED_REPLY" if e.flags & protocol.FLAG_NEED_REPLY else ""
        lines.append(f"{e.t - start:10.6f} {arrow} {e.request:<22} {format_payload(e.request, e.payload)}"
                     f"{flags}{format_fds(e.fds)}".rstrip())
    return lines


# -- encode --------------------------------------------------------------------------------------

def request_number(name: str) -> int:
    if name.startswith("UNKNOWN_"):
        return int(name[len("UNKNOWN_"):])
    try:
        return Request[name]
    except KeyError:
        raise LabError(f"unknown request {name!r} in the trace") from None


def encode(request: str, payload: Any) -> bytes:
    """The wire payload of a recorded (decoded) incoming message."""
    if payload is None:
        return b""
    if isinstance(payload, str):  # recorded undecoded: raw bytes as hex
        return bytes.fromhex(payload)
    if isinstance(payload, int):
        return protocol.U64.pack(payload)
    keys = set(payload)
    if keys == {"regions"}:
        regions = payload["regions"]
        return protocol.MEMORY_HEADER.pack(len(regions), 0) + b"".join(
            protocol.MEMORY_REGION.pack(r["gpa"], r["size"], r["uaddr"], r["offset"]) for r in regions)
    if keys == {"index", "num"}:
        return protocol.VRING_STATE.pack(payload["index"], payload["num"])
    if keys == {"index", "nofd"}:
        return protocol.U64.pack(payload["index"] | (protocol.VRING_NOFD if payload["nofd"] else 0))
    if keys == {"index", "flags", "desc", "used", "avail", "log"}:
        return protocol.VRING_ADDR.pack(*(payload[k] for k in ("index", "flags", "desc", "used", "avail", "log")))
    if keys == {"size", "offset"}:
        return protocol.LOG_BASE.pack(payload["size"], payload["offset"])
    if keys == {"offset", "size", "flags", "data"}:
        return protocol.CONFIG_HEADER.pack(payload["offset"], payload["size"], payload["flags"]) + bytes.fromhex(
            payload["data"])
    if keys == {"mmap_size", "mmap_offset", "num_queues", "queue_size"}:
        return protocol.INFLIGHT.pack(*(payload[k] for k in ("mmap_size", "mmap_offset", "num_queues", "queue_size")))
    raise LabError(f"{request}: cannot encode a payload with fields {sorted(keys)}")


# -- replay --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BackendShape:
    """What the recorded back end must have been, read from its replies: a fresh one is made alike."""

    queues: int | None = None  # GET_QUEUE_NUM
    image_bytes: int | None = None  # blk GET_CONFIG capacity
    read_only: bool = False


def shape(entries: list[Entry]) -> BackendShape:
    queues = image_bytes = None
    read_only = False
    for e in entries:
        if e.direction != "out":
            continue
        if e.request == "GET_QUEUE_NUM" and isinstance(e.payload, int):
            queues = e.payload
        elif e.request == "GET_CONFIG" and isinstance(e.payload, dict) and len(e.payload.get("data", "")) >= 16:
            image_bytes = struct.unpack_from("<Q", bytes.fromhex(e.payload["data"]))[0] * 512
        elif e.request == "GET_FEATURES" and isinstance(e.payload, int):
            read_only = bool(e.payload >> VIRTIO_BLK_F_RO & 1)
    return BackendShape(queues, image_bytes, read_only)


@dataclasses.dataclass
class Outcome:
    sent: int = 0
    compared: int = 0
    differences: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


class _Fds:
    """The descriptors the replay hands over, kept open (as a front end keeps its own) until the end."""

    def __init__(self) -> None:
        self.kept: list[int] = []
        self.inflight: int | None = None  # the new back end's GET_INFLIGHT_FD fd

    def make(self, request: str, described: dict) -> int | None:
        kind = described.get("fd")
        if request == "SET_INFLIGHT_FD" and self.inflight is not None:
            fd = os.dup(self.inflight)
        elif kind in ("memfd", "file"):
            fd = os.memfd_create(f"lab-replay-{request.lower()}", os.MFD_CLOEXEC)
            os.ftruncate(fd, int(described.get("size", 0)))
        elif kind == "eventfd":
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        elif kind == "pipe":
            fd, other = os.pipe()
            self.kept.append(other)
        elif kind == "socket":  # e.g. SET_SLAVE_REQ_FD: the back end's channel to us
            ours, theirs = socket.socketpair()
            fd, other = theirs.detach(), ours.detach()
            self.kept.append(other)
        else:
            return None  # a descriptor closed before it was traced: nothing to recreate
        self.kept.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.kept + ([self.inflight] if self.inflight is not None else []):
            try:
                os.close(fd)
            except OSError:
                pass


def replay(entries: list[Entry], socket_path: str, timeout: float = REPLY_SECONDS) -> Outcome:
    """Send the recorded front-end messages to the back end on `socket_path`; compare replies."""
    outcome = Outcome()
    fds = _Fds()
    bases: dict[int, int] = {}  # ring index -> base from SET_VRING_BASE
    connection = VhostUserConnection(socket_path, timeout)
    try:
        for i, entry in enumerate(entries):
            if entry.direction != "in":
                continue
            expected = _replies_after(entries, i)
            _unexpected(connection, outcome, entry)
            sent = [fd for fd in (fds.make(entry.request, d) for d in entry.fds) if fd is not None]
            number = request_number(entry.request)
            try:
                connection.send(number, encode(entry.request, entry.payload), sent, entry.flags)
                outcome.sent += 1
                if entry.request == "SET_VRING_BASE":
                    bases[entry.payload["index"]] = entry.payload["num"]
                for recorded in expected:
                    got, flags, payload, reply_fds = connection.recv(timeout)
                    outcome.compared += 1
                    _compare(outcome, entry, recorded, got, flags, payload, reply_fds, bases, fds)
            except BackendTimeout:
                outcome.differences.append(f"line {entry.line} {entry.request}: no reply within {timeout:.0f} s "
                                           f"(recorded: {len(expected)})")
                break
            except BackendClosed:
                later = [e for e in entries[i + 1:] if e.direction == "in"]
                text = f"line {entry.line} {entry.request}: the back end closed the connection"
                if later or expected:
                    outcome.differences.append(f"{text}, the recording goes on ({len(later)} more messages)")
                else:
                    outcome.notes.append(f"{text} after the last recorded message")
                break
        else:
            _unexpected(connection, outcome, None, wait=0.2)
    finally:
        connection.close()
        fds.close()
    return outcome


def _replies_after(entries: list[Entry], i: int) -> list[Entry]:
    replies = []
    for e in entries[i + 1:]:
        if e.direction != "out":
            break
        replies.append(e)
    return replies


def _unexpected(connection: VhostUserConnection, outcome: Outcome, before: Entry | None, wait: float = 0.0) -> None:
    """Replies the recording does not have (checked between messages without waiting for them)."""
    while select.select([connection.sock], [], [], wait)[0]:
        try:
            got, _, payload, reply_fds = connection.recv(REPLY_SECONDS)
        except (BackendClosed, BackendTimeout, ProtocolError):
            return
        for fd in reply_fds:
            os.close(fd)
        where = f"before line {before.line} {before.request}" if before else "after the last message"
        outcome.differences.append(f"{where}: unrecorded reply {_name(got)} {payload.hex()}")


def _name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"UNKNOWN_{request}"


def _compare(outcome: Outcome, sent: Entry, recorded: Entry, got: int, flags: int, payload: bytes,
             reply_fds: list[int], bases: dict[int, int], fds: _Fds) -> None:
    where = f"line {recorded.line} {sent.request}"
    described_fds = [protocol.describe_fd(fd) for fd in reply_fds]
    if got == Request.GET_INFLIGHT_FD and reply_fds:
        if fds.inflight is not None:
            os.close(fds.inflight)
        fds.inflight = reply_fds.pop(0)
    for fd in reply_fds:
        os.close(fd)
    value = protocol.describe(protocol.decode_reply(got, payload))
    want = recorded.payload
    if recorded.request == "GET_VRING_BASE" and isinstance(want, dict):
        base = bases.get(want["index"], 0)
        if want["num"] != base:
            outcome.notes.append(f"{where} ring {want['index']}: recorded base {want['num']} came from guest I/O "
                                 f"(not in a trace); expecting the start base {base}")
            want = {**want, "num": base}
    mismatches = []
    if _name(got) != recorded.request:
        mismatches.append(f"reply to {_name(got)}, recorded {recorded.request}")
    if flags != recorded.flags:
        mismatches.append(f"flags {flags:#x}, recorded {recorded.flags:#x}")
    if value != want:
        mismatches.append(f"payload {format_payload(recorded.request, value)}, recorded "
                          f"{format_payload(recorded.request, want)}")
    if described_fds != recorded.fds:
        mismatches.append(f"fds {described_fds}, recorded {recorded.fds}")
    if mismatches:
        outcome.differences.append(f"{where}: " + "; ".join(mismatches))
