"""Continuous verified I/O in a guest that lives through migrations (the host side).

The agent (liveio_agent.py, run in the guest as labvirtio.liveio) runs detached from SSH, so the
connection to a source guest may die with the source; the host talks to whichever machine
currently runs the guest through files in the agent's state directory. Start one agent per
guest and disk and keep it across any number of migrations: its committed writes then describe
the disk completely, which the final verification relies on. `stop()` collects the
agent's report; `verify_image()` checks the writes it committed in the host's image file.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from pathlib import Path

from lab.errors import LabError, TimeoutExpired
from lab.guest import stamps
from lab.guest.ssh import GuestSSH
from lab.virtio.workload import Mismatch, verify_image

AGENT = Path(__file__).resolve().parent / "liveio_agent.py"
STATE = "/tmp/liveio"
MODULE = "liveio"
START_SECONDS = 60.0
FINISH_SECONDS = 300.0  # joining the workers and reading both regions back, under TCG


@dataclasses.dataclass(frozen=True)
class LiveIOConfig:
    """Where and how hard the agent works; block numbers are 4 KiB blocks of the device."""

    seed: int
    read_first: int = 0
    read_count: int = 4096  # stamped before the agent starts; must stay generation 1
    write_first: int = 8192
    write_count: int = 2048
    slots: int = 1024  # read buffers held in guest memory
    read_blocks: int = 1  # blocks per read
    pool: int = 1024  # write buffers filled ahead, per writer
    write_threads: int = 1  # writers, each on its own slice of the write region
    readers: bool = True
    writers: bool = True
    read_pause: float = 0.0  # seconds between operations: a lighter load
    write_pause: float = 0.0


@dataclasses.dataclass
class LiveIOResult:
    reads: int
    writes: int
    mismatch_count: int
    mismatches: list[dict]
    errors: list[str]
    committed: dict[int, int]

    def problems(self) -> list[str]:
        found = [f"agent error: {e}" for e in self.errors]
        if self.mismatch_count:
            kinds: dict[str, int] = {}
            for m in self.mismatches:
                kinds[f"{m['where']}/{m['kind']}"] = kinds.get(f"{m['where']}/{m['kind']}", 0) + 1
            first = self.mismatches[0]
            found.append(f"{self.mismatch_count} blocks wrong in the guest (first {len(self.mismatches)}: {kinds}); "
                         f"first: block {first['lba']} {first['where']} {first['kind']}: expected {first['expected']}, "
                         f"found {first['found']}")
        return found


class LiveIO:
    def __init__(self, config: LiveIOConfig) -> None:
        self.config = config
        self.device = ""

    def start(self, ssh: GuestSSH, device: str) -> None:
        """Stamp the read region, install the agent and start it detached; wait until it runs."""
        cfg = self.config
        if ssh.run(f"test -e {STATE}", check=False).exit_status == 0:
            raise LabError("a live I/O agent already ran in this guest: its writes on the disk would fail a new "
                           "agent's verification (keep one LiveIO across migrations)")
        self.device = device
        stamps.install(ssh)
        ssh.put(AGENT, f"{stamps.GUEST_DIR}/{stamps.PACKAGE}/{MODULE}.py")
        stamps.write(ssh, device, stamps.StampWrite(cfg.read_first, cfg.read_count, 1), cfg.seed)
        agent_cfg = {**dataclasses.asdict(cfg), "device": device, "dir": STATE, "block": stamps.BLOCK,
                     "readers": int(cfg.readers), "writers": int(cfg.writers)}
        ssh.run(f"mkdir -p {STATE}")
        ssh.start_detached(f"cd {stamps.GUEST_DIR} && exec python3 -m {stamps.PACKAGE}.{MODULE} "
                           f"{shlex.quote(json.dumps(agent_cfg))}", log=f"{STATE}/agent.log")
        deadline = time.monotonic() + START_SECONDS
        while ssh.run(f"test -e {STATE}/ready", check=False).exit_status != 0:
            if time.monotonic() > deadline:
                raise TimeoutExpired(f"live I/O agent not running after {START_SECONDS:.0f}s: {self._log(ssh)}")
            time.sleep(0.2)

    def progress(self, ssh: GuestSSH) -> dict:
        """The agent's latest counters: reads, writes, mismatches and their count per place
        found ("read", "held", "final") in `by_where` (guest time `t`)."""
        out = ssh.run(f"tail -n 1 {STATE}/stats.jsonl").stdout.strip()
        if not out:
            return {"reads": 0, "writes": 0, "mismatches": 0, "by_where": {}}
        return json.loads(out)

    def wait_for_more(self, ssh: GuestSSH, operations: int, timeout: float, counter: str = "any") -> dict:
        """Wait until the agent has done `operations` more reads+writes ("any"), or more of one
        kind ("reads", "writes"): it is alive and its device works; LabError if it does not
        within `timeout`."""
        def done(p: dict) -> int:
            return p["reads"] + p["writes"] if counter == "any" else p[counter]

        start = self.progress(ssh)
        deadline = time.monotonic() + timeout
        while True:
            now = self.progress(ssh)
            if done(now) >= done(start) + operations:
                return now
            if time.monotonic() > deadline:
                raise TimeoutExpired(f"guest I/O stalled: {now['reads']} reads, {now['writes']} writes "
                                     f"(wanted {operations} more {counter} in {timeout:.0f}s)")
            time.sleep(0.2)

    def checkpoint(self, ssh: GuestSSH, timeout: float) -> dict:
        """Wait until every read buffer the guest holds now has been verified again (the reader
        reuses its slots in ring order and checks each before reuse, so one more turn of the
        ring covers them all); the agent's counters then (mismatch counts only ever grow)."""
        counter, turn = ("reads", self.config.slots) if self.config.readers else ("writes", self.config.pool)
        return self.wait_for_more(ssh, turn, timeout, counter)

    def stop(self, ssh: GuestSSH) -> LiveIOResult:
        """Ask the agent to finish, wait for its report (following its final verification)."""
        ssh.run(f"touch {STATE}/stop")
        deadline = time.monotonic() + FINISH_SECONDS
        while ssh.run(f"test -e {STATE}/result.json", check=False).exit_status != 0:
            if ssh.run(f"pgrep -f {stamps.PACKAGE}.{MODULE}", check=False).exit_status != 0:
                if ssh.run(f"test -e {STATE}/result.json", check=False).exit_status == 0:
                    break
                raise LabError(f"live I/O agent died without a report: {self._log(ssh)}")
            if time.monotonic() > deadline:
                raise TimeoutExpired(f"live I/O agent still finishing after {FINISH_SECONDS:.0f}s")
            time.sleep(0.3)
        raw = json.loads(ssh.run(f"cat {STATE}/result.json").stdout)
        return LiveIOResult(raw["reads"], raw["writes"], raw["mismatch_count"], raw["mismatches"], raw["errors"],
                            {int(k): v for k, v in raw["committed"].items()})

    def verify_image(self, image: Path, result: LiveIOResult) -> list[Mismatch]:
        """The host's view: the read region still generation 1, each written block at the
        generation the agent committed last (unwritten ones zero)."""
        cfg = self.config
        out = verify_image(image, 1, cfg.seed, first_lba=cfg.read_first, count=cfg.read_count)
        if cfg.writers:
            out += verify_image(image, result.committed, cfg.seed, first_lba=cfg.write_first, count=cfg.write_count)
        return out

    @staticmethod
    def _log(ssh: GuestSSH) -> str:
        return ssh.run(f"tail -n 5 {STATE}/agent.log", check=False).stdout.strip()
