"""`lab trace show FILE` / `lab trace replay FILE --backend blk|scsi`: vhost-user message traces."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from lab import trace
from lab.backends import SCSI_KIND, BackendProcess, ScsiLun
from lab.qemu.machine import create_raw_image

DEFAULT_IMAGE_MIB = 64


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "trace",
        help="pretty-print or replay a back end's vhost-user message trace",
        description="Our back ends' --trace writes every vhost-user message as a JSON line (kept with each "
        "scenario's artifacts and in each lab's directory as trace.jsonl).",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="one readable line per message",
                              description="Print every message: time since the first, direction (-> from the "
                              "front end, <- the back end's reply), request, decoded payload, file descriptors.")
    show.add_argument("file", type=Path, help="the trace (JSON lines)")
    show.set_defaults(func=run_show)
    replay = actions.add_parser(
        "replay", help="replay the front end's side against a fresh back end and compare the replies",
        description="Start a fresh back end shaped like the recorded one (queues, image size and read-only flag "
        "read from the recorded replies), send it every recorded front-end message with new descriptors (memory "
        "regions as memfds of the recorded sizes, eventfds, its own inflight fd) and report every reply that "
        "differs from the recording. Exit status 0: no difference.")
    replay.add_argument("file", type=Path, help="the trace (JSON lines)")
    replay.add_argument("--backend", choices=("blk", "scsi"), required=True, help="which of our back ends to run")
    replay.add_argument("--image", type=Path, help="the image to serve (default: a fresh sparse one of the recorded size)")
    replay.add_argument("--keep", action="store_true", help="keep the replay's directory (back end log and trace)")
    replay.set_defaults(func=run_replay)


def run_show(args: argparse.Namespace) -> int:
    for line in trace.show(trace.read(args.file)):
        print(line)
    return 0


def run_replay(args: argparse.Namespace) -> int:
    entries = trace.read(args.file)
    recorded = trace.shape(entries)
    work = Path(tempfile.mkdtemp(prefix="lab-replay-"))
    keep = args.keep
    try:
        image = args.image
        if image is None:
            mib = -(-recorded.image_bytes // (1 << 20)) if recorded.image_bytes else DEFAULT_IMAGE_MIB
            image = create_raw_image(work / "disk.img", mib)
        queues = recorded.queues or 1
        common = dict(socket=str(work / "vu.sock"), log=work / "backend.log",
                      extra=("--trace", str(work / "trace.jsonl")))
        if args.backend == "scsi":
            backend = BackendProcess(kind=SCSI_KIND, luns=(ScsiLun(0, 0, str(image)),), queues=max(1, queues - 2),
                                     **common)
        else:
            backend = BackendProcess(kind="ours", image=str(image), queues=queues, read_only=recorded.read_only,
                                     **common)
        backend.start()
        try:
            outcome = trace.replay(entries, backend.socket)
        finally:
            problems = backend.finish()
        print(f"replayed {outcome.sent} messages of {args.file} against a fresh {args.backend} back end "
              f"({queues} queues, image {image}): {outcome.compared} replies compared")
        for note in outcome.notes:
            print(f"  note: {note}")
        for problem in problems:
            print(f"  back end: {problem}")
        if outcome.differences:
            print(f"{len(outcome.differences)} differences from the recording:")
            for difference in outcome.differences:
                print(f"  {difference}")
        else:
            print("no difference from the recording")
        keep = keep or bool(outcome.differences or problems)
        if keep:
            print(f"replay directory kept: {work}")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if outcome.differences or problems else 0
