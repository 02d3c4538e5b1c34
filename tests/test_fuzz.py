"""The fuzzer (lab.fuzz) against our back end: a quick campaign in every test run, a long one
under the `fuzz` marker for nightly, and checks that its properties can fail at all."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lab.fuzz import messages, rings
from lab.fuzz.memory import GuardedMemory
from lab.fuzz.runner import Campaign, FuzzFailure, decode, encode
from lab.fuzz.target import Daemon, Finding
from lab.fuzz.wire import Msg, Wire

REPO = Path(__file__).resolve().parents[1]
QUICK_SECONDS = 20.0
LONG_SECONDS = float(os.environ.get("LAB_FUZZ_SECONDS", "600"))


def _campaign(workdir: Path, seconds: float) -> None:
    seed = int(os.environ.get("LAB_FUZZ_SEED", random.randrange(1 << 32)))
    campaign = Campaign(workdir, seed)
    try:
        stats = campaign.run(seconds)
    except FuzzFailure as failure:
        pytest.fail(f"fuzz finding (seed {seed}): {failure}\ncase: {failure.case}", pytrace=False)
    print(stats.line())
    assert stats.cases > stats.seeds and stats.verified_io > 0


def test_quick_fuzz_campaign(tmp_path: Path) -> None:
    """The seeds (bad-input list, CVE shapes) and QUICK_SECONDS of generated cases: no finding."""
    _campaign(tmp_path, QUICK_SECONDS)


@pytest.mark.fuzz
def test_long_fuzz_campaign(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if "fuzz" not in (request.config.option.markexpr or ""):
        pytest.skip("long fuzz run: select it with -m fuzz (LAB_FUZZ_SECONDS, default 600)")
    _campaign(tmp_path, LONG_SECONDS)


# ---- the properties can fail ----------------------------------------------------------------


@pytest.fixture
def daemon(tmp_path: Path):
    target = Daemon(tmp_path).start()
    yield target
    target.stop()


def test_fd_leak_is_a_finding(daemon: Daemon) -> None:
    messages.run(daemon, messages.SESSION)  # clean
    daemon.idle_fds -= 1  # as if the daemon kept one fd more than when it was idle
    with pytest.raises(Finding, match="fd leak"):
        messages.run(daemon, (Msg(messages.R.GET_FEATURES),))


def test_silence_is_a_hang(tmp_path: Path) -> None:
    """A peer that accepts and never answers fails the probe (real socket, nobody replying)."""
    path = str(tmp_path / "mute.sock")
    with socket.socket(socket.AF_UNIX) as mute:
        mute.bind(path)
        mute.listen(1)
        memory = GuardedMemory()
        wire = Wire(path, memory)
        try:
            with pytest.raises(Finding, match="hang"):
                wire.probe("a message to a mute peer")
        finally:
            wire.close()
            memory.close()


def test_writes_outside_writable_buffers_are_found() -> None:
    before = bytearray(rings.SIZE)
    rings.DESC.pack_into(before, rings.DESC_GPA, 0x50000, 16, rings.WRITE, 0)
    after = bytearray(before)
    after[0x50000 + 15] = 1  # inside the writable buffer
    after[rings.USED_GPA + 2] = 1  # used idx
    allowed = rings.writable_ranges(before, 16)
    assert rings.foreign_writes(before, bytes(after), allowed) == []
    after[0x50000 + 16] = 1  # one byte past it
    assert rings.foreign_writes(before, bytes(after), allowed) == [0x50000 + 16]


def test_canary_guards_the_regions() -> None:
    memory = GuardedMemory()
    try:
        memory.write(rings.SIZE - 4, b"\xff" * 8)  # clipped at the end of guest memory
        assert memory.canaries_intact()
        memory.regions[0].mm[0] ^= 0xFF  # as a back end ignoring mmap_offset would
        assert not memory.canaries_intact()
    finally:
        memory.close()


def test_cases_round_trip_through_json() -> None:
    for case in [*messages.SEEDS.values(), *rings.SEEDS.values()]:
        assert decode(encode(case)) == case


def _lab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_cli_replays_a_reproducer_and_rejects_bad_input(tmp_path: Path) -> None:
    reproducer = tmp_path / "case.json"
    reproducer.write_text(f'{{"case": {__import__("json").dumps(encode(rings.SEEDS["loop"]))}}}')
    result = _lab("fuzz", "--replay", str(reproducer))
    assert result.returncode == 0 and "does not reproduce" in result.stdout, result.stderr
    for args, message in {("--seconds", "-1"): "must not be negative",
                          ("--replay", str(tmp_path / "none.json")): "does not exist"}.items():
        result = _lab("fuzz", *args)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
