"""A time-boxed fuzzing campaign against one daemon: the explicit seeds first, then hypothesis
examples in chunks until the time is up; a finding is shrunk by hypothesis and written as a
JSON reproducer that `lab fuzz --replay FILE` runs again on a fresh daemon."""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from lab.fuzz import messages, rings
from lab.fuzz.target import Daemon, Finding
from lab.fuzz.wire import Msg

CHUNK = 40  # examples per hypothesis run; the clock is looked at between runs
VERIFY_EVERY = 10  # cases between two verified-I/O connections

Case = tuple[Msg, ...] | rings.RingCase
cases = st.one_of(messages.sequences, rings.ring_cases())


@dataclasses.dataclass
class Stats:
    seed: int
    cases: int = 0
    seeds: int = 0
    outcomes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    verified_io: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        rate = self.cases / self.seconds if self.seconds else 0.0
        return (f"[{self.seconds:6.0f}s] {self.cases} cases ({rate:.0f}/s; {outcomes}), "
                f"{self.verified_io} verified-I/O connections")


class FuzzFailure(Exception):
    """A property failed; `reproducer` is the JSON file describing the (shrunk) case."""

    def __init__(self, finding: str, case: Case, reproducer: Path) -> None:
        super().__init__(f"{finding}\nreproducer: {reproducer} (run: lab fuzz --replay {reproducer})")
        self.finding = finding
        self.case = case
        self.reproducer = reproducer


def kind_of(case: Case) -> str:
    return "ring" if isinstance(case, rings.RingCase) else "messages"


def execute(daemon: Daemon, case: Case) -> str:
    return rings.run(daemon, case) if isinstance(case, rings.RingCase) else messages.run(daemon, case)


class Campaign:
    def __init__(self, workdir: Path, seed: int | None = None, progress: Callable[[Stats], None] | None = None,
                 report_every: float = 5.0) -> None:
        self.workdir = workdir
        self.stats = Stats(seed if seed is not None else random.randrange(1 << 32))
        self._progress = progress
        self._report_every = report_every
        self._last_report = 0.0
        self._started = 0.0
        self.daemon = Daemon(workdir)

    def run(self, seconds: float) -> Stats:
        """Seeds, then generated cases for the rest of `seconds`; FuzzFailure on a finding."""
        self._started = time.monotonic()
        self.daemon.start()
        try:
            for name, case in [*messages.SEEDS.items(), *rings.SEEDS.items()]:
                self._one(case, f"seed {name!r}")
                self.stats.seeds += 1
            self._verify()
            rng = random.Random(self.stats.seed)
            while time.monotonic() - self._started < seconds:
                self._chunk(rng.randrange(1 << 32))
            self._verify()
        finally:
            self._tick(force=True)
            self.daemon.stop()
        return self.stats

    def _one(self, case: Case, label: str) -> None:
        try:
            outcome = execute(self.daemon, case)
        except Finding as exc:
            raise FuzzFailure(f"{label}: {exc}", case, self._write_reproducer(case, str(exc))) from None
        self._count(case, outcome)

    def _count(self, case: Case, outcome: str) -> None:
        self.stats.cases += 1
        self.stats.outcomes[f"{kind_of(case)} {outcome}"] += 1
        if self.stats.cases % VERIFY_EVERY == 0:
            self._verify()
        self._tick()

    def _verify(self) -> None:
        self.daemon.verified_io()
        self.stats.verified_io += 1

    def _chunk(self, chunk_seed: int) -> None:
        failing: list[tuple[Case, str]] = []

        @hypothesis_seed(chunk_seed)
        @settings(max_examples=CHUNK, deadline=None, database=None, report_multiple_bugs=False,
                  phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck),
                  verbosity=Verbosity.quiet, print_blob=False)
        @given(cases)
        def check(case: Case) -> None:
            try:
                outcome = execute(self.daemon, case)
            except Finding as exc:
                failing.append((case, str(exc)))
                self._restart()  # each shrinking step starts from a clean daemon
                raise
            self._count(case, outcome)

        try:
            check()
        except Finding:
            case, finding = failing[-1]  # hypothesis replays the shrunk example last
            raise FuzzFailure(finding, case, self._write_reproducer(case, finding)) from None

    def _restart(self) -> None:
        self.daemon.stop()
        self.daemon = Daemon(self.workdir)
        self.daemon.start()

    def _tick(self, force: bool = False) -> None:
        now = time.monotonic()
        self.stats.seconds = now - self._started
        if self._progress and (force or now - self._last_report >= self._report_every):
            self._last_report = now
            self._progress(self.stats)

    def _write_reproducer(self, case: Case, finding: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix="lab-fuzz-finding-", dir=self.workdir)) / "case.json"
        path.write_text(json.dumps({"finding": finding, "seed": self.stats.seed, "kind": kind_of(case),
                                    "case": encode(case)}, indent=1) + "\n")
        (path.parent / "backend.log").write_text(self.daemon.process.log_text())
        return path


def replay(workdir: Path, reproducer: Path) -> str:
    """Run the reproducer's case on a fresh daemon: its outcome, or FuzzFailure."""
    case = decode(json.loads(reproducer.read_text())["case"])
    daemon = Daemon(workdir).start()
    try:
        try:
            outcome = execute(daemon, case)
            daemon.verified_io()
        except Finding as exc:
            raise FuzzFailure(str(exc), case, reproducer) from None
    finally:
        daemon.stop()
    return outcome


# ---- cases as JSON -----------------------------------------------------------------------------

_TYPES = {"Msg": Msg, "RingCase": rings.RingCase}


def encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {"type": type(value).__name__,
                **{f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, (tuple, list)):
        return [encode(v) for v in value]
    return value


def decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "hex" in value:
            return bytes.fromhex(value["hex"])
        cls = _TYPES[value["type"]]
        return cls(**{k: decode(v) for k, v in value.items() if k != "type"})
    if isinstance(value, list):
        return tuple(decode(v) for v in value)
    return value
