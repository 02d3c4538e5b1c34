"""The vhost-user daemon: listening socket, one front end at a time, event loop.

One process, one selector over the listening socket (while idle), the front end's socket, the
kick eventfds and a signal wake-up socket. Ring processing (Connection.process_rings) is kept
apart from message handling (Connection.on_readable) so rings can later move to per-queue
workers. A front end that breaks the protocol, or whose guest corrupts a ring, gets its device
marked broken: one ERROR line, the connection closed, the next front end served.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import signal
import socket
import stat
import time
from array import array
from dataclasses import dataclass, field, replace
from typing import Any, Callable, TextIO

from lab.errors import LabError
from lab.vhost_user import DeviceBroken, postcopy, protocol
from lab.vhost_user.device import Buffers, ConfigRejected, Device
from lab.vhost_user.dirty_log import DirtyLog
from lab.vhost_user.inflight import InflightRegion, create_region
from lab.vhost_user.memory import GuestMemory
from lab.vhost_user.postcopy import FaultCount, PostcopyError
from lab.vhost_user.protocol import (
    CONFIG_HEADER,
    HEADER,
    INFLIGHT,
    U64,
    VRING_STATE,
    Message,
    ProtocolFeature,
    Request,
    bit,
)
from lab.vhost_user.ring import VirtQueue

log = logging.getLogger(__name__)

FAULTS = ("no-inflight", "no-dirty-log", "no-postcopy-register")
TRANSPORT_FEATURES = (
    bit(protocol.F_VERSION_1)
    | bit(protocol.F_INDIRECT_DESC)
    | bit(protocol.F_EVENT_IDX)
    | bit(protocol.F_PROTOCOL_FEATURES)
    | bit(protocol.F_LOG_ALL)
)
BASE_PROTOCOL_FEATURES = (
    bit(ProtocolFeature.MQ)
    | bit(ProtocolFeature.LOG_SHMFD)
    | bit(ProtocolFeature.REPLY_ACK)
    | bit(ProtocolFeature.RESET_DEVICE)
)
MESSAGE_TIMEOUT = 5.0  # a front end that stops mid-message is broken, not waited for forever
POLL_SECONDS = 200e-6  # keep looking at the rings this long after work before sleeping


class RequestFailed(Exception):
    """A well-formed request the device declines; answered as failure, the connection lives."""


@dataclass
class Reply:
    payload: bytes
    fds: list[int] = field(default_factory=list)


class Trace:
    """Every vhost-user message, decoded, one JSON object per line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def record(self, direction: str, request: int, flags: int, payload: Any, fds: list[dict]) -> None:
        try:
            name = Request(request).name
        except ValueError:
            name = f"UNKNOWN_{request}"
        entry = {"t": round(time.time(), 6), "dir": direction, "request": name, "flags": flags,
                 "payload": protocol.describe(payload), "fds": fds}
        self._stream.write(json.dumps(entry) + "\n")
        self._stream.flush()


@dataclass
class Options:
    faults: frozenset[str] = frozenset()
    trace: Trace | None = None
    #: userfaultfd works here, so PAGEFAULT (postcopy) is offered; the Server probes it
    postcopy: bool = False


def _require_eventfd(fd: int, what: str) -> None:
    if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventfd]":
        raise DeviceBroken(f"{what}: fd is not an eventfd")


class Connection:
    """One front end: the protocol state machine and the rings it configures."""

    def __init__(self, sock: socket.socket, device: Device, options: Options, selector: selectors.BaseSelector) -> None:
        self.sock = sock
        self.device = device
        self.options = options
        self._selector = selector
        self.rings = [VirtQueue(i) for i in range(device.num_queues)]
        self.features = 0
        self.protocol_features = 0
        self.memory: GuestMemory | None = None
        self.log: DirtyLog | None = None
        self.inflight: InflightRegion | None = None
        self._ufd = -1  # our copy of the userfaultfd handed to QEMU at POSTCOPY_ADVISE
        self._listening = False  # between POSTCOPY_LISTEN and POSTCOPY_END
        self._faults: FaultCount | None = None  # counting while postcopy runs
        self.faults_total = 0
        sock.settimeout(MESSAGE_TIMEOUT)
        selector.register(sock, selectors.EVENT_READ, self)
        self.offered_features = TRANSPORT_FEATURES | device.features()
        self.offered_protocol = BASE_PROTOCOL_FEATURES
        if device.has_config:
            self.offered_protocol |= bit(ProtocolFeature.CONFIG)
        if device.tracks_inflight:
            self.offered_protocol |= bit(ProtocolFeature.INFLIGHT_SHMFD)
        if options.postcopy:
            self.offered_protocol |= bit(ProtocolFeature.PAGEFAULT)
        device.attach(self)

    # ---- wire ----------------------------------------------------------------------------

    def _recv_exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise DeviceBroken("front end closed the socket in the middle of a message")
            data += chunk
        return data

    def _recv(self) -> Message | None:
        try:
            data, ancillary, msg_flags, _ = self.sock.recvmsg(
                HEADER.size, socket.CMSG_SPACE(protocol.MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
            )
        except (ConnectionResetError, socket.timeout):
            return None
        fds = array("i")
        for level, kind, cdata in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
        msg = Message(0, 0, b"", list(fds))
        try:
            if not data:
                msg.close_fds()
                return None
            if msg_flags & socket.MSG_CTRUNC:
                raise DeviceBroken(f"more than {protocol.MAX_FDS} fds attached to a message")
            try:
                data += self._recv_exact(HEADER.size - len(data))
                msg.request, msg.flags, size = HEADER.unpack(data)
                protocol.check_header(msg.request, msg.flags, size)
                msg.payload = self._recv_exact(size)
            except socket.timeout:
                raise DeviceBroken("front end stalled in the middle of a message") from None
        except BaseException:
            msg.close_fds()
            raise
        return msg

    def _send(self, request: int, reply: Reply) -> None:
        if self.options.trace:
            self.options.trace.record("out", request, protocol.VERSION | protocol.FLAG_REPLY,
                                      protocol.decode_reply(request, reply.payload),
                                      [protocol.describe_fd(fd) for fd in reply.fds])
        data = protocol.encode_reply(request, reply.payload)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", reply.fds))] if reply.fds else []
        self.sock.sendmsg([data], ancillary)

    # ---- messages ------------------------------------------------------------------------

    def on_readable(self) -> bool:
        """Handle one message; False when the front end has gone."""
        msg = self._recv()
        if msg is None:
            return False
        try:
            self._dispatch(msg)
        finally:
            msg.close_fds()
        return True

    def _dispatch(self, msg: Message) -> None:
        trace = self.options.trace
        fds = [protocol.describe_fd(fd) for fd in msg.fds] if trace else []
        if not protocol.supported(msg.request, self.protocol_features):
            if trace:
                trace.record("in", msg.request, msg.flags, msg.payload, fds)
            log.warning("unsupported request %s ignored", msg.name)
            if msg.need_reply:
                self._send(msg.request, Reply(U64.pack(1)))
            return
        try:
            payload = protocol.decode(msg, len(self.rings))
        except DeviceBroken:
            if trace:
                trace.record("in", msg.request, msg.flags, msg.payload, fds)
            raise
        if trace:
            trace.record("in", msg.request, msg.flags, payload, fds)
        handler: Callable[[Message, Any], Reply | None] = getattr(self, f"_on_{Request(msg.request).name.lower()}")
        status = 0
        try:
            reply = handler(msg, payload)
        except RequestFailed as exc:
            log.warning("%s failed: %s", msg.name, exc)
            reply, status = None, 1
        if reply is not None:
            try:
                self._send(msg.request, reply)
            finally:
                for fd in reply.fds:
                    os.close(fd)
        elif msg.need_reply and self.protocol_features & bit(ProtocolFeature.REPLY_ACK):
            self._send(msg.request, Reply(U64.pack(status)))

    def _on_get_features(self, msg: Message, _: None) -> Reply:
        return Reply(U64.pack(self.offered_features))

    def _on_set_features(self, msg: Message, features: int) -> None:
        foreign = features & ~self.offered_features
        if foreign & ~self.device.foreign_features:
            raise DeviceBroken(f"SET_FEATURES: bits {foreign:#x} were not offered")
        if foreign:
            log.info("SET_FEATURES: ignoring bits %#x the front end emulates itself", foreign)
            features &= self.offered_features
        self.features = features
        for ring in self.rings:
            ring.event_idx = bool(features & bit(protocol.F_EVENT_IDX))
            ring.indirect = bool(features & bit(protocol.F_INDIRECT_DESC))
            if not features & bit(protocol.F_PROTOCOL_FEATURES):
                ring.enabled = True  # without bit 30 rings are enabled from the start
        self._update_logging()
        self.device.set_features(features)

    def _on_get_protocol_features(self, msg: Message, _: None) -> Reply:
        return Reply(U64.pack(self.offered_protocol))

    def _on_set_protocol_features(self, msg: Message, features: int) -> None:
        if features & ~self.offered_protocol:
            raise DeviceBroken(f"SET_PROTOCOL_FEATURES: bits {features & ~self.offered_protocol:#x} were not offered")
        self.protocol_features = features

    def _on_get_queue_num(self, msg: Message, _: None) -> Reply:
        return Reply(U64.pack(len(self.rings)))

    def _on_set_owner(self, msg: Message, _: None) -> None:
        pass

    def _on_reset_owner(self, msg: Message, _: None) -> None:
        self._reset_rings()

    def _on_reset_device(self, msg: Message, _: None) -> None:
        self._reset_rings()
        self.features = 0
        self._update_logging()

    def _on_set_mem_table(self, msg: Message, table: protocol.MemoryTable) -> None:
        if self._listening and self._ufd < 0:
            raise DeviceBroken("SET_MEM_TABLE: postcopy listening without a userfaultfd (no POSTCOPY_ADVISE)")
        fds = [msg.take_fd(i) for i in range(len(msg.fds))]
        for ring in self.rings:
            ring.detach()
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self.memory = GuestMemory(table.regions, fds)
        if self._listening:
            self._postcopy_memory(table)
        for ring in self.rings:
            ring.attach(self.memory)

    def _postcopy_memory(self, table: protocol.MemoryTable) -> None:
        """The postcopy half of SET_MEM_TABLE: tell QEMU where we mapped each region (it turns
        our fault addresses into guest pages with them), wait until it is ready for faults, then
        make every page not yet arrived fault."""
        ours = tuple(replace(r, uaddr=self.memory.host_address(r.gpa)) for r in table.regions)
        self._send(Request.SET_MEM_TABLE, Reply(protocol.encode_memory_table(ours)))
        self._expect_mem_table_ack()
        if "no-postcopy-register" in self.options.faults:
            log.warning("fault injected: guest memory NOT registered with userfaultfd (no-postcopy-register)")
            return
        spans = self.memory.mappings()
        try:
            for address, length in spans:
                postcopy.register_missing(self._ufd, address, length)
        except PostcopyError as exc:
            raise DeviceBroken(f"postcopy: {exc}") from None
        log.info("postcopy: %d regions (%d MiB) registered with userfaultfd", len(spans),
                 sum(length for _, length in spans) >> 20)

    def _expect_mem_table_ack(self) -> None:
        ack = self._recv()
        if ack is None:
            raise DeviceBroken("front end went away before acking the postcopy memory table")
        try:
            if self.options.trace:
                self.options.trace.record("in", ack.request, ack.flags, ack.payload, [])
            if ack.request != Request.SET_MEM_TABLE or len(ack.payload) != U64.size or ack.fds:
                raise DeviceBroken(f"postcopy SET_MEM_TABLE: expected its ack (u64), got {ack.name} of "
                                   f"{len(ack.payload)} bytes with {len(ack.fds)} fds")
            if U64.unpack(ack.payload)[0] != 0:
                raise DeviceBroken("postcopy SET_MEM_TABLE: the front end refused our mapping")
        finally:
            ack.close_fds()

    # ---- postcopy ------------------------------------------------------------------------

    def _on_postcopy_advise(self, msg: Message, _: None) -> Reply:
        self._close_ufd()
        try:
            self._ufd = postcopy.open_userfaultfd()
        except PostcopyError as exc:
            log.warning("POSTCOPY_ADVISE failed: %s", exc)
            return Reply(b"")  # no fd: QEMU fails the migration with a clear message
        return Reply(b"", [os.dup(self._ufd)])

    def _on_postcopy_listen(self, msg: Message, _: None) -> Reply:
        if self.memory is not None:
            log.warning("POSTCOPY_LISTEN refused: guest memory is already mapped")
            return Reply(U64.pack(1))
        self._listening = True
        self._faults = FaultCount()
        return Reply(U64.pack(0))

    def _on_postcopy_end(self, msg: Message, _: None) -> Reply:
        faults = self._faults or FaultCount()
        self.faults_total += faults.faults
        log.info("postcopy ended: faults=%d requests=%d", faults.faults, faults.requests)
        self._listening = False
        self._faults = None
        self._close_ufd()
        return Reply(U64.pack(0))

    def _close_ufd(self) -> None:
        if self._ufd >= 0:
            os.close(self._ufd)
            self._ufd = -1

    def _on_set_log_base(self, msg: Message, base: protocol.LogBase) -> Reply:
        new = DirtyLog(msg.take_fd(), base)
        if self.log is not None:
            self.log.close()
        self.log = new
        self._update_logging()
        return Reply(U64.pack(0))

    def _update_logging(self) -> None:
        active = self.log if self.features & bit(protocol.F_LOG_ALL) else None
        for ring in self.rings:
            ring.log = active
            ring.log_buffers = "no-dirty-log" not in self.options.faults

    def _on_set_vring_num(self, msg: Message, state: protocol.VringState) -> None:
        self.rings[state.index].set_num(state.num)

    def _on_set_vring_addr(self, msg: Message, addr: protocol.VringAddr) -> None:
        self.rings[addr.index].set_addr(addr, self.memory)

    def _on_set_vring_base(self, msg: Message, state: protocol.VringState) -> None:
        self.rings[state.index].last_avail = state.num

    def _on_get_vring_base(self, msg: Message, state: protocol.VringState) -> Reply:
        ring = self.rings[state.index]
        self._unwatch_kick(ring)
        return Reply(VRING_STATE.pack(state.index, ring.stop()))

    def _on_set_vring_kick(self, msg: Message, file: protocol.VringFile) -> None:
        ring = self.rings[file.index]
        fd = -1 if file.nofd else msg.take_fd()
        self._unwatch_kick(ring)
        ring.set_file("kick", fd)  # owned by the ring before any check can fail
        if fd >= 0:
            _require_eventfd(fd, "SET_VRING_KICK")
            self._selector.register(fd, selectors.EVENT_READ, ring)
        skip = "no-inflight" in self.options.faults
        resubmitted = ring.start(skip_inflight=skip)
        ring.kicked = True  # requests may already wait (or were resubmitted)
        if resubmitted:
            log.info("vring %d: %s %d inflight requests", ring.index, "dropping" if skip else "resubmitting",
                     resubmitted)

    def _unwatch_kick(self, ring: VirtQueue) -> None:
        if ring.kick_fd >= 0:
            try:
                self._selector.unregister(ring.kick_fd)
            except KeyError:
                pass

    def _on_set_vring_call(self, msg: Message, file: protocol.VringFile) -> None:
        self._set_notifier(msg, file, "call")

    def _on_set_vring_err(self, msg: Message, file: protocol.VringFile) -> None:
        self._set_notifier(msg, file, "err")

    def _set_notifier(self, msg: Message, file: protocol.VringFile, kind: str) -> None:
        fd = -1 if file.nofd else msg.take_fd()
        self.rings[file.index].set_file(kind, fd)
        if fd >= 0:
            _require_eventfd(fd, f"SET_VRING_{kind.upper()}")

    def _on_set_vring_enable(self, msg: Message, state: protocol.VringState) -> None:
        ring = self.rings[state.index]
        ring.enabled = bool(state.num)
        ring.kicked = ring.enabled  # a kick may have come before the enable: look again

    def _on_get_config(self, msg: Message, access: protocol.ConfigAccess) -> Reply:
        try:
            data = self.device.get_config(access.offset, access.size)
        except ConfigRejected as exc:
            log.warning("GET_CONFIG refused: %s", exc)
            return Reply(b"")
        return Reply(CONFIG_HEADER.pack(access.offset, access.size, access.flags) + data)

    def _on_set_config(self, msg: Message, access: protocol.ConfigAccess) -> None:
        try:
            self.device.set_config(access.offset, access.data)
        except ConfigRejected as exc:
            raise RequestFailed(str(exc)) from None

    def _on_get_inflight_fd(self, msg: Message, spec: protocol.Inflight) -> Reply:
        fd, size = create_region(spec.num_queues, spec.queue_size)
        return Reply(INFLIGHT.pack(size, 0, spec.num_queues, spec.queue_size), [fd])

    def _on_set_inflight_fd(self, msg: Message, spec: protocol.Inflight) -> None:
        region = InflightRegion(msg.take_fd(), spec)
        self._drop_inflight()
        self.inflight = region
        for ring in self.rings:
            ring.inflight = region.queue(ring.index)

    def _drop_inflight(self) -> None:
        for ring in self.rings:
            ring.inflight = None
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None

    # ---- rings ---------------------------------------------------------------------------

    def process_rings(self) -> int:
        done = 0
        now = time.monotonic()
        for ring in self.rings:
            if not (ring.kicked or ring.kick_fd < 0 or now < ring.busy_until):
                continue
            ring.kicked = False
            if ring.has_work():
                index = ring.index
                handled = ring.process(lambda buffers: self._handle(index, buffers), ring.num)
                if handled:
                    ring.busy_until = now + POLL_SECONDS
                done += handled
        return done

    def _handle(self, queue: int, buffers: Buffers) -> int | None:
        if self._faults is not None:
            self._faults.count(buffers.readable + buffers.writable)
        return self.device.handle(queue, buffers)

    def complete_held(self, queue: int, fill: Callable[[Buffers], int]) -> bool:
        return self.rings[queue].complete_held(fill)

    @property
    def polled(self) -> bool:
        """Some ring runs without a kick fd (NOFD) and must be looked at periodically."""
        return any(ring.running and ring.kick_fd < 0 for ring in self.rings)

    def _reset_rings(self) -> None:
        for ring in self.rings:
            self._unwatch_kick(ring)
            ring.reset()
        self._update_logging()

    def close(self) -> None:
        """Forget everything this front end set up; no guest memory is touched afterwards."""
        self.device.attach(None)
        self._reset_rings()
        self._drop_inflight()
        self._close_ufd()
        if self.log is not None:
            self.log.close()
            self.log = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        try:
            self._selector.unregister(self.sock)
        except KeyError:
            pass
        self.sock.close()


def prepare_socket_path(path: str) -> None:
    """Refuse a path a live listener owns; remove a stale socket file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise LabError(f"socket path {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        log.info("removed stale socket %s", path)
        return
    except OSError as exc:
        raise LabError(f"cannot probe socket path {path}: {exc.strerror or exc}") from None
    finally:
        probe.close()
    raise LabError(f"socket path {path} is in use by a live listener")


def listen_unix(path: str, backlog: int, name: str | None = None) -> socket.socket:
    """A unix stream socket listening on `path` (see prepare_socket_path); LabError naming
    `name` (default: the path) when it cannot."""
    prepare_socket_path(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(backlog)
    except OSError as exc:
        listener.close()
        # a too-long path fails without an errno ("AF_UNIX path too long")
        raise LabError(f"cannot listen on {name or path}: {exc.strerror or exc}") from None
    return listener


def close_listener(listener: socket.socket, path: str) -> None:
    """Close a socket from listen_unix and remove its path."""
    listener.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Server:
    """Serve `device` on a unix socket, one front end at a time, until SIGTERM/SIGINT."""

    def __init__(self, path: str, device: Device, options: Options | None = None) -> None:
        self.path = path
        self.device = device
        self._listener = listen_unix(path, 1)
        unavailable = postcopy.probe()
        if unavailable:
            log.warning("postcopy unavailable, PAGEFAULT not offered: %s", unavailable)
        else:
            log.info("postcopy available (userfaultfd works): PAGEFAULT offered")
        self.options = replace(options or Options(), postcopy=unavailable is None)
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        for fileobj, callback in device.watch():
            self._selector.register(fileobj, selectors.EVENT_READ, callback)
        self._conn: Connection | None = None
        self._stopping = False

    def stop(self, *_: object) -> None:
        self._stopping = True

    def serve_forever(self) -> None:
        previous = {sig: signal.signal(sig, self.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno())
        log.info("listening on %s", self.path)
        try:
            self._loop()
        finally:
            # close (flush the image) before the default handlers return: a second SIGTERM
            # meanwhile must not kill the daemon half way
            try:
                self.close()
            finally:
                signal.set_wakeup_fd(old_wakeup)
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    def _loop(self) -> None:
        busy_until = 0.0
        while not self._stopping:
            conn = self._conn
            if time.monotonic() < busy_until:
                timeout: float | None = 0
            elif conn is not None and conn.polled:
                timeout = 0.001
            else:
                timeout = None
            for key, _ in self._selector.select(timeout):
                self._on_event(key)
            if self._conn is not None and self._guard(self._conn.process_rings):
                busy_until = time.monotonic() + POLL_SECONDS

    def _on_event(self, key: selectors.SelectorKey) -> None:
        data = key.data
        if data == "listen":
            self._accept()
        elif data == "wake":
            try:
                self._wake_r.recv(64)
            except BlockingIOError:
                pass
        elif isinstance(data, Connection):
            if data is self._conn and not self._guard(data.on_readable):
                if self._conn is data:
                    log.info("front end disconnected")
                    self._drop_connection()
        elif isinstance(data, VirtQueue):
            if data.kick_fd != key.fd:
                return  # an earlier event of this batch replaced or closed that kick fd
            data.kicked = True
            try:
                os.read(key.fd, 8)
            except BlockingIOError:
                pass
        elif callable(data):
            self._device_input(data)

    def _device_input(self, callback: Callable[[], None]) -> None:
        """The device's own input (admin socket); it may complete held requests on the rings,
        so a ring fault found there ends the connection like any other."""
        conn = self._conn
        try:
            callback()
        except DeviceBroken as exc:
            if conn is not None and conn is self._conn:
                log.error("device broken: %s", exc)
                self._drop_connection()
        except Exception as exc:  # a bug must not take the daemon down
            log.exception("device input failed: %s", exc)

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(True)
        self._selector.unregister(self._listener)
        self._conn = Connection(sock, self.device, self.options, self._selector)
        log.info("front end connected")

    def _guard(self, step: Callable[[], Any]) -> Any:
        """Run a connection step; a broken device or a vanished peer ends the connection only."""
        try:
            return step()
        except DeviceBroken as exc:
            log.error("device broken: %s", exc)
        except (BrokenPipeError, ConnectionResetError):
            log.info("front end disconnected")
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                log.exception("device broken: %s", exc)
        except Exception as exc:  # a bug must not take the daemon down for the next front end
            log.exception("device broken: internal error: %s", exc)
        self._drop_connection()
        return None

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.close()
        self._selector.register(self._listener, selectors.EVENT_READ, "listen")

    def close(self) -> None:
        """Drop the front end, make the image durable, remove the socket."""
        self._drop_connection()
        try:
            self.device.flush()
        finally:
            self.device.close()
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()
            close_listener(self._listener, self.path)
            log.info("stopped")
