"""`lab backend DEVICE ...`: run a vhost-user back end in the foreground until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import contextlib
import logging

from lab.errors import LabError
from lab.vhost_user.blk import BlkDevice
from lab.vhost_user.device import Device
from lab.vhost_user.scsi import ScsiDevice, parse_address
from lab.vhost_user.scsi_target import ScsiTarget
from lab.vhost_user.server import FAULTS, Options, Server, Trace


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("backend", help="run a vhost-user back end (foreground)")
    devices = parser.add_subparsers(dest="device", metavar="DEVICE", required=True)

    blk = devices.add_parser("blk", help="vhost-user-blk on a raw image file")
    blk.add_argument("--socket", required=True, help="unix socket path to listen on")
    blk.add_argument("--image", required=True, help="raw image file (size a multiple of 512)")
    blk.add_argument("--queues", type=int, default=1, help="number of request queues (1..256)")
    blk.add_argument("--read-only", action="store_true", help="offer VIRTIO_BLK_F_RO, fail writes")
    blk.add_argument("--serial", default="", help="GET_ID answer (up to 20 bytes)")
    _common_options(blk)
    blk.set_defaults(func=run_blk)

    scsi = devices.add_parser("scsi", help="vhost-user-scsi with LUNs on raw image files")
    scsi.add_argument("--socket", required=True, help="unix socket path to listen on")
    scsi.add_argument("--lun", action="append", default=[], metavar="T:L=FILE[,ro]",
                      help="a logical unit: target T (0..255), LUN L (0..16383), raw image FILE (repeatable)")
    scsi.add_argument("--queues", type=int, default=1,
                      help="request queues (QEMU's num_queues must not exceed it; it defaults to the vCPU count)")
    scsi.add_argument("--admin", metavar="SOCK",
                      help='JSON-line admin socket: {"op":"add-lun","lun":"0:1","file":F,"ro":false}, '
                           '{"op":"remove-lun","lun":"0:1"}')
    _common_options(scsi)
    scsi.set_defaults(func=run_scsi)


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", metavar="FILE", help="write every vhost-user message as JSON lines")
    parser.add_argument("--log", metavar="FILE", help="also write the log to FILE")
    parser.add_argument("--fault", action="append", default=[], choices=FAULTS,
                        help="break a mechanism on purpose (repeatable)")


def run_blk(args: argparse.Namespace) -> int:
    device = BlkDevice(args.image, num_queues=args.queues, read_only=args.read_only, serial=args.serial)
    return _serve(args, device)


def parse_lun(spec: str) -> tuple[int, int, str, bool]:
    """"T:L=FILE[,ro]" -> (target, lun, file, read_only)."""
    address, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise LabError(f"--lun {spec!r}: expected TARGET:LUN=FILE[,ro]")
    target, lun = parse_address(address)
    path, *options = rest.split(",")
    unknown = [o for o in options if o != "ro"]
    if unknown:
        raise LabError(f"--lun {spec!r}: expected TARGET:LUN=FILE[,ro], not option {unknown[0]!r}")
    if not path:
        raise LabError(f"--lun {spec!r}: expected TARGET:LUN=FILE[,ro]")
    return target, lun, path, bool(options)


def run_scsi(args: argparse.Namespace) -> int:
    specs = [parse_lun(spec) for spec in args.lun]
    target = ScsiTarget()
    try:
        for t, lun, path, read_only in specs:
            target.add(t, lun, path, read_only)
        device = ScsiDevice(target, request_queues=args.queues, admin=args.admin)
    except BaseException:
        target.close()
        raise
    return _serve(args, device)


def _serve(args: argparse.Namespace, device: Device) -> int:
    with contextlib.ExitStack() as stack:
        stack.callback(device.close)
        if args.log:
            handler = logging.FileHandler(args.log)
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
            logging.getLogger().addHandler(handler)
            stack.callback(logging.getLogger().removeHandler, handler)
            stack.callback(handler.close)
        trace = None
        if args.trace:
            try:
                trace = Trace(stack.enter_context(open(args.trace, "w", buffering=1)))
            except OSError as exc:
                raise LabError(f"cannot write trace {args.trace}: {exc.strerror}") from None
        server = Server(args.socket, device, Options(frozenset(args.fault), trace))
        server.serve_forever()
    return 0
