"""`lab image build [--force]` and `lab image info`: the cached guest image."""

from __future__ import annotations

import argparse
import json
import sys

from images import builder
from lab.errors import LabError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("image", help="build or describe the guest image")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = actions.add_parser(
        "build", help="build the image if the cache lacks it; print its info"
    )
    build.add_argument(
        "--force", action="store_true", help="rebuild even if a cached image exists"
    )
    build.set_defaults(func=run_build)
    info = actions.add_parser("info", help="print the cached image's info as JSON")
    info.add_argument(
        "--verify", action="store_true", help="hash the whole rootfs against its stamp"
    )
    info.set_defaults(func=run_info)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _print(info: object) -> None:
    print(json.dumps(info.to_json(), indent=2))


def run_build(args: argparse.Namespace) -> int:
    _print(builder.ensure_image(progress=_progress, force=args.force))
    return 0


def run_info(args: argparse.Namespace) -> int:
    directory = builder.image_dir()
    if not directory.is_dir():
        raise LabError(
            f"no guest image for this recipe in {directory.parent}: run `lab image build`"
        )
    _print(builder.load_image(directory, deep=args.verify))
    return 0
