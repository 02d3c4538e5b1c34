"""`lab bench backend` end to end with tiny runs: both back ends really serve I/O, the JSON is whole."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lab.backends import BACKEND_KINDS, REPO, backend_available
from lab.bench.backend import QUEUE_COUNTS, TARGETS, WORKLOADS


@pytest.fixture(scope="module")
def result() -> dict:
    for kind in BACKEND_KINDS:
        reason = backend_available(kind)
        if reason:
            pytest.skip(reason)
    argv = [sys.executable, "-m", "lab", "bench", "backend", "--json",
            "--seconds", "0.05", "--repeat", "1", "--image-size", "16M", "--no-scsi"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "[16/16]" in done.stderr  # progress goes to stderr, one line per run
    return json.loads(done.stdout)


def test_every_row_measured_on_both_back_ends(result: dict) -> None:
    assert result["bench"] == "backend"
    assert result["repeat"] == 1 and result["image_size"] == 16 << 20
    assert "qemu-storage-daemon" in result["qsd_version"]
    rows = result["rows"]
    assert [(r["workload"], r["queues"]) for r in rows] == [(w.name, q) for w in WORKLOADS for q in QUEUE_COUNTS]
    for row in rows:
        for kind in BACKEND_KINDS:
            side = row[kind]
            assert side["iops"] > 0 and len(side["iops_runs"]) == 1
            assert side["mb_s"] == pytest.approx(side["iops"] * row["block_size"] / 1e6, rel=0.01)
            # a live process has at least a few MiB resident: the value is really read from /proc
            assert side["peak_rss_kib"] > 1024
        assert row["ratio"] == pytest.approx(row["ours"]["iops"] / row["qsd"]["iops"], abs=0.001)


def test_targets_are_judged(result: dict) -> None:
    judged = {(r["workload"], r["queues"]): r for r in result["rows"] if r["target"] is not None}
    assert set(judged) == set(TARGETS)
    for row in judged.values():
        assert row["meets_target"] == (row["ratio"] >= row["target"])
    assert result["targets_met"] == all(r["meets_target"] for r in judged.values())
