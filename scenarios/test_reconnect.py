"""Our blk back end SIGKILLed under guest I/O and restarted on the same socket: QEMU reconnects
(chardev `reconnect=1`), the back end replays the requests left in flight from the inflight
region, and the guest never notices.

Workload in the guest, all at once on one vhost-user-blk disk with two queues:
- fio, write + verify, two jobs (one per vCPU, so one per hardware queue) at queue depth 32,
  run again and again until the kills are over; every run must complete and verify;
- our acknowledging writer: threads each stamping their own blocks (lab.virtio.workload) with
  O_DIRECT, one write at a time, counting the writes the device acknowledged. After the kills
  the writer flushes (fsync: a virtio flush) and the host checks, in the image file, that every
  block holds the generation of its last acknowledged write: no acknowledged write lost.

Each kill is aimed: the back end is stopped (SIGSTOP) until its inflight region shows at least
MIN_INFLIGHT popped-but-unanswered requests, and then SIGKILLed, so every kill really leaves
requests for the replay. That makes the same scenario with `--fault no-inflight` (requests
dropped instead of replayed) fail for certain: the guest's lost requests never complete, which
the drain check sees as I/O that stopped with requests outstanding.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fixtures.backend import ServedDisk
from lab.guest import fio, stamps
from lab.guest.ssh import GuestSSH
from lab.qemu.machine import vhost_user_blk_disk
from lab.vhost_user.inflight import ENTRY, HEADER, queue_stride
from lab.virtio.workload import verify_image

pytestmark = [pytest.mark.blk, pytest.mark.boot, pytest.mark.slow]

MiB = 1 << 20
BLOCK = stamps.BLOCK
SEED = 0xC0FFEE
QUEUES = 2
DISK_MIB = 64
KILLS = 5
MIN_INFLIGHT = 4  # requests popped and not answered when the back end is killed
AIM_SECONDS = 60.0  # to catch the back end with MIN_INFLIGHT requests in flight
RECONNECT_SECONDS = 60.0  # QEMU retries every second; TCG guests on a loaded host are slow
STALL_SECONDS = 30.0  # guest requests outstanding and none completing: they are lost
DRAIN_SECONDS = 600.0
RUN_SECONDS = 600.0  # one fio run or the writer; bounded by the drain in practice

# Disk layout: fio's two jobs in [0, 16M), the writer's threads in [16M, 32M).
FIO_JOB_MIB = 8
WRITER_FIRST_LBA = 16 * MiB // BLOCK
WRITER_THREADS = 4
WRITER_BLOCKS = 1024  # per thread

# Runs in the guest as `python3 -m labvirtio.ackwriter DEV FIRST PER THREADS SEED STOPFILE`.
# Thread t writes blocks FIRST + t*PER + (k % PER) with generation 1 + k // PER for k = 0, 1, ...
# one at a time until STOPFILE exists; a write counts once pwrite has returned (acknowledged).
_ACK_WRITER = '''
import json, mmap, os, sys, threading
from .workload import fill

def main():
    device, stop = sys.argv[1], sys.argv[6]
    first, per, threads, seed = (int(a) for a in sys.argv[2:6])
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    acked, errors = [0] * threads, []

    def writer(t):
        buf = mmap.mmap(-1, 4096)
        view = memoryview(buf)
        try:
            k = 0
            while not os.path.exists(stop):
                lba = first + t * per + k % per
                fill(view, lba, 1 + k // per, seed, 4096)
                if os.pwrite(fd, view, lba * 4096) != 4096:
                    raise OSError(f"short write at block {lba}")
                k += 1
                acked[t] = k
        except Exception as exc:
            errors.append(f"thread {t}: {exc}")

    pool = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    os.fsync(fd)
    os.close(fd)
    print(json.dumps({"acked": acked, "errors": errors}))
    sys.exit(1 if errors else 0)

main()
'''
GUEST_DIR = stamps.GUEST_DIR
STOP_FILE = f"{GUEST_DIR}/stop"


class LostRequests(AssertionError):
    """Guest requests that never complete after a back end restart."""


@dataclass
class Workload:
    """fio runs and the acknowledging writer, each on its own host thread over SSH."""

    ssh: GuestSSH
    dev: str
    fio_runs: int = 0
    writer_result: dict | None = None
    errors: list[str] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        stamps.install(self.ssh)
        self.ssh.run(f"cat > {GUEST_DIR}/{stamps.PACKAGE}/ackwriter.py <<'EOF'\n{_ACK_WRITER}\nEOF")
        self.ssh.run(f"rm -f {STOP_FILE}")
        for target in (self._fio_loop, self._writer):
            thread = threading.Thread(target=self._guard, args=(target,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Ask both to finish (fio ends its current run); see drained()."""
        self._stop.set()
        self.ssh.run(f"touch {STOP_FILE}")

    def drained(self) -> bool:
        return not any(thread.is_alive() for thread in self._threads)

    def _guard(self, target) -> None:
        try:
            target()
        except Exception as exc:  # reported by the scenario, which owns the assertions
            self.errors.append(f"{target.__name__}: {exc}")

    def _fio_loop(self) -> None:
        job = {
            "filename": self.dev,
            "rw": "randwrite",
            "bs": "16k",
            "size": f"{FIO_JOB_MIB}M",
            "offset_increment": f"{FIO_JOB_MIB}M",
            "numjobs": 2,
            "cpus_allowed": "0-1",
            "cpus_allowed_policy": "split",  # one job per vCPU: both hardware queues busy
            "iodepth": 32,
            "iodepth_batch_submit": 8,
            "direct": 1,
            "ioengine": "libaio",
            "verify": "crc32c",
            "verify_fatal": 1,
        }
        while not self._stop.is_set():
            report = fio.run(self.ssh, {"reconnect": job}, timeout=RUN_SECONDS)
            assert len(report.jobs) == 2 and all(j.read_iops > 0 for j in report.jobs), report.jobs
            self.fio_runs += 1

    def _writer(self) -> None:
        args = [self.dev, WRITER_FIRST_LBA, WRITER_BLOCKS, WRITER_THREADS, SEED, STOP_FILE]
        out = self.ssh.run(
            f"cd {GUEST_DIR} && python3 -m {stamps.PACKAGE}.ackwriter {shlex.join(map(str, args))}",
            timeout=RUN_SECONDS,
        ).stdout
        self.writer_result = json.loads(out)

    def expected(self) -> dict[int, int | None]:
        """The generation each writer block must hold: that of its last acknowledged write."""
        assert self.writer_result is not None
        generations: dict[int, int | None] = {}
        for t, acked in enumerate(self.writer_result["acked"]):
            passes, rest = divmod(acked, WRITER_BLOCKS)
            for i in range(WRITER_BLOCKS):
                generation = passes + 1 if i < rest else passes
                generations[WRITER_FIRST_LBA + t * WRITER_BLOCKS + i] = generation or None
        return generations


# ---- the back end, seen from the host ----------------------------------------------------------


def inflight_requests(pid: int) -> int | None:
    """Requests marked in flight in the back end's inflight region (layout: lab.vhost_user.
    inflight), read through the process's own mapping; None before the region exists."""
    with open(f"/proc/{pid}/maps") as maps:
        ranges = [line.split()[0] for line in maps if "vhost-user-inflight" in line]
    if not ranges:
        return None
    with open(f"/proc/{pid}/map_files/{ranges[0]}", "rb") as region:
        data = region.read()
    count, offset = 0, 0
    while offset + HEADER.size <= len(data):
        desc_num = HEADER.unpack_from(data, offset)[2]
        entries = range(offset + HEADER.size, offset + HEADER.size + ENTRY.size * desc_num, ENTRY.size)
        count += sum(data[entry] for entry in entries)
        offset += queue_stride(desc_num)
    return count


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "T"


def kill_with_requests_in_flight(disk: ServedDisk, minimum: int) -> int:
    """SIGKILL the back end at a moment it holds at least `minimum` popped, unanswered requests
    (frozen with SIGSTOP to look); returns how many it held."""
    backend = disk.backend
    pid = backend.pid
    deadline = time.monotonic() + AIM_SECONDS
    while True:
        os.kill(pid, signal.SIGSTOP)
        frozen = time.monotonic() + 5.0
        while not _stopped(pid):
            backend.check_alive()
            if time.monotonic() > frozen:
                raise AssertionError(f"the back end (pid {pid}) did not stop on SIGSTOP within 5s")
            time.sleep(0.0005)
        held = inflight_requests(pid) or 0
        if held >= minimum:
            backend.kill()
            return held
        os.kill(pid, signal.SIGCONT)
        if time.monotonic() > deadline:
            raise AssertionError(f"the back end never held {minimum} requests in flight in {AIM_SECONDS}s")
        time.sleep(random.uniform(0.002, 0.02))


def wait_reconnected(disk: ServedDisk) -> None:
    """Until QEMU has restarted every ring on the new back end (its trace shows the enables)."""
    assert disk.trace is not None
    deadline = time.monotonic() + RECONNECT_SECONDS
    while True:
        enabled = set()
        if disk.trace.exists():
            for line in disk.trace.read_text(errors="replace").splitlines():
                entry = json.loads(line) if line.endswith("}") else {}
                if entry.get("request") == "SET_VRING_ENABLE" and entry["payload"]["num"] == 1:
                    enabled.add(entry["payload"]["index"])
        if enabled == set(range(QUEUES)):
            return
        disk.backend.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"QEMU did not restart the rings within {RECONNECT_SECONDS}s (enabled: {enabled})")
        time.sleep(0.2)


# ---- the guest's view --------------------------------------------------------------------------


def io_counters(ssh: GuestSSH, dev: str) -> tuple[int, int]:
    """(requests completed, requests in flight) of the guest's disk."""
    fields = ssh.run(f"cat /sys/block/{Path(dev).name}/stat").stdout.split()
    reads, writes, inflight = int(fields[0]), int(fields[4]), int(fields[8])
    return reads + writes, inflight


def wait_progress(ssh: GuestSSH, dev: str) -> None:
    """Some guest request completes (I/O resumed after a restart)."""
    done, _ = io_counters(ssh, dev)
    deadline = time.monotonic() + STALL_SECONDS
    while io_counters(ssh, dev)[0] == done:
        if time.monotonic() > deadline:
            raise LostRequests(f"no guest request completed within {STALL_SECONDS}s of the reconnect")
        time.sleep(0.5)


def drain(workload: Workload, dev: str) -> None:
    """Stop the workload and wait for it to end; requests outstanding while none completes for
    STALL_SECONDS are lost (LostRequests)."""
    workload.stop()
    deadline = time.monotonic() + DRAIN_SECONDS
    last, since = -1, time.monotonic()
    while not workload.drained():
        done, inflight = io_counters(workload.ssh, dev)
        if done != last or not inflight:
            last, since = done, time.monotonic()
        elif time.monotonic() - since > STALL_SECONDS:
            raise LostRequests(
                f"{inflight} guest requests outstanding and none completed for {STALL_SECONDS}s: "
                "requests in flight at the kill were never answered"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"the guest workload did not finish within {DRAIN_SECONDS}s")
        time.sleep(1.0)


def run_kills(disk: ServedDisk, machine_factory, kills: int) -> tuple[Workload, list[int]]:
    """Boot, start the workload, kill and restart the back end `kills` times, drain."""
    vm = machine_factory(options=vhost_user_blk_disk(disk.name, disk.backend.socket, QUEUES, reconnect=1))
    dev = vm.ssh.disk_by_serial(disk.serial)
    workload = Workload(vm.ssh, dev)
    workload.start()
    held = []
    for _ in range(kills):
        wait_progress(vm.ssh, dev)
        time.sleep(random.uniform(1.0, 3.0))
        held.append(kill_with_requests_in_flight(disk, MIN_INFLIGHT))
        disk.backend.start()
        wait_reconnected(disk)
        wait_progress(vm.ssh, dev)
    drain(workload, dev)
    return workload, held


def test_backend_killed_five_times_loses_nothing(backend_factory, machine_factory) -> None:
    disk = backend_factory("ours", "vu0", size_mib=DISK_MIB, queues=QUEUES)
    workload, held = run_kills(disk, machine_factory, KILLS)

    assert not workload.errors, workload.errors
    assert workload.fio_runs >= 1
    result = workload.writer_result
    assert result is not None and not result["errors"], result
    mismatches = verify_image(disk.image, workload.expected(), SEED, first_lba=WRITER_FIRST_LBA,
                              count=WRITER_THREADS * WRITER_BLOCKS)
    assert not mismatches, "acknowledged writes lost:\n" + "\n".join(map(str, mismatches[:10]))
    # every restart replayed what the killed back end held (its log: "resubmitting N")
    replays = [line for line in disk.backend.log_text().splitlines() if "resubmitting" in line]
    assert len(replays) >= KILLS, f"held {held} at the kills, replays logged: {replays}"
    print(f"kills: {KILLS}, requests in flight at each: {held}, fio runs verified: {workload.fio_runs}, "
          f"writer acks: {sum(result['acked'])}")


def test_dropped_inflight_requests_are_detected(backend_factory, machine_factory) -> None:
    """The scenario's checks must be able to fail: a back end that drops its inflight
    requests on restart (`--fault no-inflight`) is caught."""
    disk = backend_factory("ours", "vu0", size_mib=DISK_MIB, queues=QUEUES, faults=("no-inflight",),
                           expect_errors=True)
    with pytest.raises(LostRequests):
        run_kills(disk, machine_factory, 1)
    assert any("dropping" in line for line in disk.backend.log_text().splitlines())
