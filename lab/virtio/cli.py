"""The guest-side command line of the userspace driver (`python3 labvirtio.pyz ...`).

    list                       virtio PCI functions, their kind and kernel driver
    info BDF                   initialise the device, print features, queues, config (scsi: disks)
    io BDF --rw randrw --bs 4k --qd 32 --seconds N --seed S --verify --json
    io BDF ... --until-stopped FILE --progress FILE   run until FILE exists, counters as JSON lines

A device is taken from the kernel for the command and given back when it ends (also on SIGTERM
or SIGHUP). Problems print one line, `labvirtio: error: ...`, and exit with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import sys
from typing import Sequence, TextIO, Union

from . import VirtioError
from .blk import BlkDevice
from .dma import HUGEPAGE
from .engine import RW_MODES, BlkTarget, IoEngine, IoSpec, ScsiTarget, Target, Tick
from .pci import PciFunction, PciTransport, find, list_functions, require_root
from .scsi import ScsiHost

DRIVEN_KINDS = ("blk", "scsi")
SCSI_SCRATCH = 64 << 10  # data buffer of each scsi queue for synchronous commands (scan, flush)
Device = Union[BlkDevice, ScsiHost]


def size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([km]?)b?", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 4k, 1m)")
    return int(match[1]) << {"": 0, "k": 10, "m": 20}[match[2]]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="labvirtio", description="userspace virtio-pci driver (blk, scsi)")
    commands = top.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="virtio PCI functions")
    listing.add_argument("--json", action="store_true")
    info = commands.add_parser("info", help="initialise a device and describe it")
    info.add_argument("device", help="BDF (0000:00:10.0) or vendor:device id")
    info.add_argument("--hugepages", type=int, default=4, help="2 MiB pages of DMA memory (4)")
    info.add_argument("--json", action="store_true")
    io = commands.add_parser("io", help="timed block I/O with latency and optional verification")
    io.add_argument("device", help="BDF (0000:00:10.0) or vendor:device id")
    io.add_argument("--rw", choices=RW_MODES, default="randread")
    io.add_argument("--bs", type=size, default=4096)
    io.add_argument("--qd", type=int, default=32, help="requests in flight on each queue")
    io.add_argument("--queues", type=int, default=1, help="request queues used in parallel")
    io.add_argument("--seconds", type=float, help="stop submitting after this long (per pass)")
    io.add_argument("--ios", type=int, help="stop after this many requests (per pass)")
    io.add_argument("--until-stopped", metavar="FILE", help="run until FILE exists (one pass)")
    io.add_argument("--progress", metavar="FILE", help="append the counters to FILE as a JSON line, every quarter second")
    io.add_argument("--seed", type=int, default=0)
    io.add_argument("--verify", action="store_true", help="stamp writes and check what reads return")
    io.add_argument("--generation", type=int, default=1, help="stamp generation of this run's writes")
    io.add_argument("--prior", type=int, help="generation the span holds before the run (0: zeros)")
    io.add_argument("--first-block", type=int, default=0, help="start of the span, in --bs blocks")
    io.add_argument("--blocks", type=int, help="length of the span (default: to the end)")
    io.add_argument("--rwmix-read", type=int, default=50, help="percent reads in randrw")
    io.add_argument("--passes", type=int, default=1, help="runs, with a device reset and re-init between")
    io.add_argument("--target", type=int, help="scsi: target of the LUN (default: the first disk found)")
    io.add_argument("--lun", type=int, default=0)
    io.add_argument("--hugepages", type=int, help="2 MiB pages of DMA memory (default: what the run needs)")
    io.add_argument("--json", action="store_true")
    return top


def driven_function(selector: str) -> PciFunction:
    function = find(selector)
    if function.virtio_type is not None and function.kind not in DRIVEN_KINDS:
        raise VirtioError(f"{function.bdf} is a virtio {function.kind} device; labvirtio drives {' and '.join(DRIVEN_KINDS)}")
    return function


def ring_size(qd: int, bs: int) -> int:
    """Descriptors for qd requests of header + status + the buffer's worst-case segments."""
    need = qd * (bs // HUGEPAGE + 4)
    return max(128, 1 << (need - 1).bit_length())


def open_device(transport: PciTransport, kind: str, queues: int, queue_size: int) -> Device:
    if kind == "blk":
        return BlkDevice(transport, num_queues=queues, queue_size=queue_size)
    return ScsiHost(transport, num_queues=queues, queue_size=queue_size, data_size=SCSI_SCRATCH)


def target_of(device: Device, target: int | None, lun: int) -> Target:
    if isinstance(device, BlkDevice):
        return BlkTarget(device)
    disks = device.scan(None if target is None else [target])
    chosen = [d for d in disks if target is None or (d.target, d.lun) == (target, lun)]
    if not chosen:
        where = "any target" if target is None else f"{target}:{lun}"
        raise VirtioError(f"no disk at {where} of the scsi host")
    return ScsiTarget(device, chosen[0])


def cmd_list(args: argparse.Namespace) -> int:
    rows = [
        {"bdf": f.bdf, "id": f.id, "kind": f.kind, "transitional": f.transitional, "driver": f.driver(),
         "block": f.block_devices()}
        for f in list_functions()
    ]
    if args.json:
        print(json.dumps(rows))
    for row in [] if args.json else rows:
        print(f"{row['bdf']}  {row['id']}  {row['kind']:6} {'transitional' if row['transitional'] else 'modern':12} "
              f"{row['driver'] or '-':12} {' '.join(row['block'])}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    require_root()
    function = driven_function(args.device)
    driver = function.driver()
    with PciTransport(function.bdf, hugepages=args.hugepages) as transport:
        offered = transport.device_features()
        device = open_device(transport, function.kind, 1, 128)
        try:
            info: dict[str, object] = {
                **transport.describe(),
                "kernel_driver": driver,
                "features_offered": f"{offered:#x}",
                "features_negotiated": f"{device.features:#x}",
                "num_queues": transport.num_queues(),
                "queue_sizes": [q.size for q in device.queues],
                "config": dataclasses.asdict(device.config),
            }
            if isinstance(device, BlkDevice):
                info["serial"] = device.get_id()
            else:
                info["disks"] = [dataclasses.asdict(d) for d in device.scan()]
        finally:
            device.device.reset()
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key}: {value}")
    return 0


def write_counters(progress: TextIO | None, engine: IoEngine) -> None:
    if progress is not None:
        progress.write(json.dumps(engine.counters().to_json()) + "\n")


def watcher(stop_file: str | None, progress: TextIO | None) -> Tick | None:
    """The engine's tick: counters out to `progress`, go on while `stop_file` does not exist."""
    if stop_file is None and progress is None:
        return None

    def tick(engine: IoEngine) -> bool:
        write_counters(progress, engine)
        return stop_file is None or not os.path.exists(stop_file)

    return tick


def cmd_io(args: argparse.Namespace) -> int:
    require_root()
    spec = IoSpec(
        rw=args.rw, bs=args.bs, qd=args.qd, queues=args.queues, seconds=args.seconds, ios=args.ios, seed=args.seed,
        verify=args.verify, generation=args.generation, prior=args.prior, first_block=args.first_block,
        blocks=args.blocks, rwmix_read=args.rwmix_read, until_stopped=args.until_stopped is not None,
    )
    spec.check()
    if args.passes < 1:
        raise VirtioError("--passes must be at least 1")
    if spec.until_stopped and args.passes != 1:
        raise VirtioError("--until-stopped runs one pass")
    function = driven_function(args.device)
    queue_size = ring_size(spec.qd, spec.bs)
    hugepages = args.hugepages or 4 + spec.queues + -(-spec.data_bytes() // HUGEPAGE)
    with contextlib.ExitStack() as stack:
        # line-buffered: a reader of the file sees whole lines only
        progress = stack.enter_context(open(args.progress, "a", buffering=1)) if args.progress else None
        tick = watcher(args.until_stopped, progress)
        transport = stack.enter_context(PciTransport(function.bdf, hugepages=hugepages))
        engine: IoEngine | None = None
        for _ in range(args.passes):
            device = open_device(transport, function.kind, spec.queues, queue_size)
            try:
                target = target_of(device, args.target, args.lun)
                if engine is None:
                    engine = IoEngine(transport.dma, spec, target.capacity, target.block_size, target.meta_size)
                engine.run(target, tick)
            finally:
                device.device.reset()  # between passes: the next one re-initialises from scratch
        write_counters(progress, engine)  # the totals at the end
        report = engine.report(function.bdf, function.kind)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        lat = report.latency
        print(f"{report.device} {report.kind} {report.rw} bs={report.bs} qd={report.qd} queues={report.queues}: "
              f"{report.iops:.0f} IOPS {report.mb_s:.1f} MB/s in {report.seconds:.1f} s, {report.errors} errors")
        print(f"latency us: mean {lat.mean_us} p50 {lat.p50_us} p99 {lat.p99_us} max {lat.max_us}")
        if args.verify:
            print(f"verify: {report.verify_checked} checked, {report.verify_errors} bad, {report.verify_unchecked} unchecked")
            for line in report.mismatches:
                print(f"  {line}")
    return 0 if not report.errors and not report.verify_errors else 1


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that give the device back


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    command = {"list": cmd_list, "info": cmd_info, "io": cmd_io}[args.command]
    try:
        return command(args)
    except VirtioError as exc:
        print(f"labvirtio: error: {exc}", file=sys.stderr)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"labvirtio: error: {where}{exc.strerror or exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("labvirtio: interrupted", file=sys.stderr)
        return 130
    return 1
