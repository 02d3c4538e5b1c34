"""Runs IN THE GUEST, as `python3 -m labvirtio.liveio CONFIG_JSON` next to a copy of lab/virtio
(standard library only): continuous verified I/O that must survive a live migration.

A reader keeps reading stamped blocks with O_DIRECT into a ring of buffer slots, so the device
writes guest memory all the time; each slot is verified right after its read (the device
delivered the right block) and again just before the slot is reused (the block is still in
guest memory: after a migration that proves the device's writes into RAM reached the
destination; a back end that does not log them leaves stale slots behind). Writers (each on
its own slice of the write region, several requests in flight) write stamped blocks of rising
generations from pools of buffers filled well ahead of use, so in postcopy the device reads
buffers the guest filled on the source shortly before the switch.

Files in the state directory: `ready` (started), `stats.jsonl` (a line every STATS_SECONDS),
`stop` (created by the host: finish), `result.json` (the final report, written atomically).
"""

import json
import mmap
import os
import random
import sys
import threading
import time

from .workload import check_block, fill

STATS_SECONDS = 0.25
MAX_REPORTED = 50


class Agent:
    def __init__(self, cfg):
        self.cfg = cfg
        self.block = cfg["block"]
        self.seed = cfg["seed"]
        self.fd = os.open(cfg["device"], os.O_RDWR | os.O_DIRECT)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.reads = 0
        self.writes = 0
        self.mismatches = []
        self.mismatch_count = 0
        self.mismatches_by_where = {}  # "read", "held", "final" -> count
        self.committed = {}
        self.errors = []

    def record(self, where, mismatch):
        with self.lock:
            self.mismatch_count += 1
            self.mismatches_by_where[where] = self.mismatches_by_where.get(where, 0) + 1
            if len(self.mismatches) < MAX_REPORTED:
                self.mismatches.append({"where": where, "lba": mismatch.lba, "kind": mismatch.kind,
                                        "expected": mismatch.expected, "found": mismatch.found, "t": time.time()})

    def check(self, view, first_lba, generation, where):
        bad = 0
        for k in range(len(view) // self.block):
            m = check_block(view[k * self.block:(k + 1) * self.block], first_lba + k, generation, self.seed)
            if m is not None:
                self.record(where, m)
                bad += 1
        return bad

    def reader(self):
        cfg, block = self.cfg, self.block
        per = cfg["read_blocks"] * block
        slots = cfg["slots"]
        buf = mmap.mmap(-1, slots * per)
        view = memoryview(buf)
        expected = [None] * slots
        rng = random.Random(self.seed)
        i = 0
        while not self.stop.is_set():
            s = i % slots
            slot = view[s * per:(s + 1) * per]
            if expected[s] is not None:
                self.check(slot, expected[s], 1, "held")  # still what the device put there?
            lba = cfg["read_first"] + rng.randrange(cfg["read_count"] - cfg["read_blocks"] + 1)
            if os.preadv(self.fd, [slot], lba * block) != per:
                raise OSError(f"short read at block {lba}")
            expected[s] = lba
            self.check(slot, lba, 1, "read")
            with self.lock:
                self.reads += 1
            i += 1
            if cfg["read_pause"]:
                time.sleep(cfg["read_pause"])
        for s in range(slots):  # the final look at every slot still in memory
            if expected[s] is not None:
                self.check(view[s * per:(s + 1) * per], expected[s], 1, "held")

    def plan(self, part, w):
        """Block and generation of writer `part`'s write number `w` (each writer owns a slice)."""
        count = self.cfg["write_count"] // self.cfg["write_threads"]
        return self.cfg["write_first"] + part * count + w % count, 2 + w // count

    def writer(self, part):
        block, pool = self.block, self.cfg["pool"]
        buf = mmap.mmap(-1, pool * block)
        view = memoryview(buf)
        # Buffers in a shuffled order: the device's next buffer is seldom next to the one the CPU
        # just refilled, so in postcopy the page it needs does not ride in on the CPU's request
        # (QEMU streams on from a requested page).
        order = list(range(pool))
        random.Random(self.seed + 1 + part).shuffle(order)
        for w in range(pool):
            fill(view[order[w] * block:(order[w] + 1) * block], *self.plan(part, w), self.seed, block)
        w = 0
        while not self.stop.is_set():
            j = order[w % pool]
            lba, generation = self.plan(part, w)
            if os.pwritev(self.fd, [view[j * block:(j + 1) * block]], lba * block) != block:
                raise OSError(f"short write at block {lba}")
            with self.lock:
                self.committed[lba] = generation
                self.writes += 1
            # refilled for the write `pool` steps ahead: filled now, sent to the device later
            fill(view[j * block:(j + 1) * block], *self.plan(part, w + pool), self.seed, block)
            w += 1
            if self.cfg["write_pause"]:
                time.sleep(self.cfg["write_pause"])

    def guarded(self, work, *args):
        try:
            work(*args)
        except Exception as exc:  # reported in result.json, the host decides
            self.errors.append(f"{work.__name__}{list(args) or ''}: {exc!r}")
            self.stop.set()

    def final_check(self):
        """Every block of both regions read back through the device and verified."""
        cfg, block = self.cfg, self.block
        chunk = 64
        buf = mmap.mmap(-1, chunk * block)
        view = memoryview(buf)
        regions = [(cfg["read_first"], cfg["read_count"], lambda lba: 1)]
        if cfg["writers"]:
            regions.append((cfg["write_first"], cfg["write_count"], self.committed.get))
        for first, count, generation in regions:
            lba = first
            while lba < first + count:
                n = min(chunk, first + count - lba)
                part = view[:n * block]
                if os.preadv(self.fd, [part], lba * block) != n * block:
                    raise OSError(f"short read at block {lba}")
                for k in range(n):
                    m = check_block(part[k * block:(k + 1) * block], lba + k, generation(lba + k), self.seed)
                    if m is not None:
                        self.record("final", m)
                lba += n

    def run(self):
        state = self.cfg["dir"]
        threads = []
        if self.cfg["readers"]:
            threads.append(threading.Thread(target=self.guarded, args=(self.reader,)))
        if self.cfg["writers"]:
            threads += [threading.Thread(target=self.guarded, args=(self.writer, part))
                        for part in range(self.cfg["write_threads"])]
        for t in threads:
            t.start()
        open(os.path.join(state, "ready"), "w").close()
        with open(os.path.join(state, "stats.jsonl"), "a", buffering=1) as stats:
            while not self.stop.is_set() and not os.path.exists(os.path.join(state, "stop")):
                with self.lock:
                    line = {"t": time.time(), "reads": self.reads, "writes": self.writes,
                            "mismatches": self.mismatch_count, "by_where": dict(self.mismatches_by_where)}
                stats.write(json.dumps(line) + "\n")
                time.sleep(STATS_SECONDS)
        self.stop.set()
        for t in threads:
            t.join()
        self.guarded(self.final_check)
        os.fsync(self.fd)
        result = {"reads": self.reads, "writes": self.writes, "mismatch_count": self.mismatch_count,
                  "mismatches": self.mismatches, "errors": self.errors,
                  "committed": {str(k): v for k, v in self.committed.items()}}
        tmp = os.path.join(state, "result.tmp")
        with open(tmp, "w") as out:
            json.dump(result, out)
        os.rename(tmp, os.path.join(state, "result.json"))


def main():
    cfg = json.loads(sys.argv[1])
    os.makedirs(cfg["dir"], exist_ok=True)
    Agent(cfg).run()


main()
