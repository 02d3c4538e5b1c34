"""Benchmarks behind `lab bench`: one module per kind, sharing the helpers below."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def spread(values: Sequence[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def emit(result: dict, as_json: bool, lines: Sequence[str]) -> None:
    """The result as one JSON document, or as the human-readable `lines`."""
    print(json.dumps(result, indent=2) if as_json else "\n".join(lines))
