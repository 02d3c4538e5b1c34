"""A migration's timeline: the guest's disk I/O over time with the migration's phases marked.

The I/O is measured where it is served, the same way for every back end kind: bytes the back
end processes read and write (/proc/PID/io rchar + wchar, all threads), sampled on the host
every SAMPLE_SECONDS, so the curve shows the guest's I/O leave the source's back end and carry
on at the destination's. Phases come from the migration's marks (QMP events and our own
actions, host wall clock): setup, each precopy pass, postcopy, the downtime, completion.
Saved as JSON (the data) and PNG (matplotlib) side by side.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from lab.qemu.migration import MigrationResult

SAMPLE_SECONDS = 0.1
MiB = 1 << 20


class IoSampler:
    """Samples the I/O byte counters of labelled processes from a background thread."""

    def __init__(self) -> None:
        self._pids: dict[str, int] = {}
        self.samples: list[tuple[float, str, int]] = []  # (wall time, label, bytes so far)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="io-sampler", daemon=True)

    def watch(self, label: str, pid: int) -> None:
        with self._lock:
            self._pids[label] = pid

    def start(self) -> IoSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            with self._lock:
                pids = dict(self._pids)
            now = time.time()
            for label, pid in pids.items():
                moved = _io_bytes(pid)
                if moved is not None:
                    self.samples.append((now, label, moved))

    def throughput(self) -> dict[str, list[tuple[float, float]]]:
        """MiB/s per label between consecutive samples, at the interval's end."""
        series: dict[str, list[tuple[float, float]]] = {}
        last: dict[str, tuple[float, int]] = {}
        for t, label, moved in list(self.samples):
            if label in last:
                t0, m0 = last[label]
                if t > t0:
                    series.setdefault(label, []).append((t, (moved - m0) / (t - t0) / MiB))
            last[label] = (t, moved)
        return series


def _io_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/io") as io:
            fields = dict(line.split(":") for line in io.read().splitlines())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return int(fields["rchar"]) + int(fields["wchar"])


def phases(result: MigrationResult) -> list[dict]:
    """Spans and instants on the wall clock: setup, passes, postcopy, downtime, completion."""
    marks = sorted(result.marks, key=lambda m: m.t)
    at = {m.what: m.t for m in reversed(marks)}  # first occurrence of each
    out: list[dict] = []
    start = at.get("migrate")
    active = at.get("status:active")
    if start is not None and active is not None:
        out.append({"kind": "span", "name": "setup", "start": start, "end": active})
    out += [{"kind": "instant", "name": f"pass {m.what.split(':')[1]}", "t": m.t}
            for m in marks if m.what.startswith("pass:")]
    out += [{"kind": "instant", "name": m.what.split(":", 1)[1], "t": m.t} for m in marks
            if m.what.startswith("switch:")]
    end = at.get("status:completed") or at.get("status:cancelled") or at.get("status:failed")
    post = at.get("status:postcopy-active")
    if post is not None and end is not None:
        out.append({"kind": "span", "name": "postcopy", "start": post, "end": end})
    if end is not None and result.downtime_ms:
        stop = post if post is not None else end - result.downtime_ms / 1000
        out.append({"kind": "span", "name": "downtime", "start": stop, "end": stop + result.downtime_ms / 1000})
    if end is not None:
        out.append({"kind": "instant", "name": result.status, "t": end})
    return out


def build(sampler: IoSampler, result: MigrationResult, title: str) -> dict:
    """The timeline as data, times in seconds from the migrate command."""
    series = sampler.throughput()
    t0 = next((m.t for m in result.marks if m.what == "migrate"), None)
    if t0 is None:
        t0 = min((pts[0][0] for pts in series.values() if pts), default=time.time())

    def rel(t: float) -> float:
        return round(t - t0, 3)

    spans = []
    for p in phases(result):
        if p["kind"] == "span":
            spans.append({**p, "start": rel(p["start"]), "end": rel(p["end"])})
        else:
            spans.append({**p, "t": rel(p["t"])})
    return {
        "title": title,
        "t0_wall": t0,
        "unit": "MiB/s served by each back end (rchar+wchar of its process)",
        "series": {label: [[rel(t), round(v, 3)] for t, v in pts] for label, pts in series.items()},
        "phases": spans,
        "result": result.to_json(),
    }


LABEL_GAP = 0.015  # of the x axis: instants closer than this share one label
SPAN_COLOURS = {"setup": "#c7d7f0", "postcopy": "#f6d7a7", "downtime": "#f3a6a6"}


def render(timeline: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.8), dpi=110)
    for label, points in timeline["series"].items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=label, linewidth=1.2)
    top = max((v for pts in timeline["series"].values() for _, v in pts), default=1.0) or 1.0
    ax.set_ylim(0, top * 1.25)
    shown: set[str] = set()
    for phase in timeline["phases"]:
        if phase["kind"] == "span":
            name = phase["name"]
            ax.axvspan(phase["start"], max(phase["end"], phase["start"] + 0.05), alpha=0.6,
                       color=SPAN_COLOURS.get(name, "#dddddd"), label=None if name in shown else name, zorder=0)
            shown.add(name)
        else:
            ax.axvline(phase["t"], color="#555555", linestyle=":", linewidth=0.9)
    for t, names in _label_groups(timeline["phases"], ax.get_xlim()):
        ax.text(t, top * 1.2, " " + ", ".join(names), rotation=90, va="top", ha="left", fontsize=7, color="#333333")
    result = timeline["result"]
    ax.set_title(f"{timeline['title']}: {result['mode']} {result['status']}"
                 + (f", downtime {result['downtime_ms']} ms" if result.get("downtime_ms") is not None else "")
                 + (f", total {result['total_ms'] / 1000:.1f} s" if result.get("total_ms") else ""), fontsize=10)
    ax.set_xlabel("seconds since the migrate command")
    ax.set_ylabel("disk I/O served, MiB/s")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def _label_groups(phases: list[dict], xlim: tuple[float, float]) -> list[tuple[float, list[str]]]:
    """The instants' labels, those closer than LABEL_GAP of the axis width merged into one (at
    the first one's place): side by side they would print over each other."""
    gap = LABEL_GAP * (xlim[1] - xlim[0])
    groups: list[tuple[float, list[str]]] = []
    for phase in sorted((p for p in phases if p["kind"] == "instant"), key=lambda p: p["t"]):
        if groups and phase["t"] - groups[-1][0] < gap:
            groups[-1][1].append(phase["name"])
        else:
            groups.append((phase["t"], [phase["name"]]))
    return groups


def save(sampler: IoSampler, result: MigrationResult, directory: Path, stem: str, title: str) -> tuple[Path, Path]:
    """Write STEM.json and STEM.png into `directory`; returns their paths."""
    timeline = build(sampler, result, title)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, png_path = directory / f"{stem}.json", directory / f"{stem}.png"
    json_path.write_text(json.dumps(timeline, indent=1))
    render(timeline, png_path)
    return json_path, png_path
