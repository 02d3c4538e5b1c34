"""Manifests: what a scenario run or a lab was, exactly enough to run it again.

manifest.json holds the exact QEMU and back end command lines, the QEMU version, the guest
image (recipe hash and files), the accelerator, the seeds, the workloads and, for a scenario,
its outcome. Every recorded path under the run's work directory is relative to `workdir`, so a
replay substitutes a fresh directory (`relocate`). repro.sh, written next to it, replays the
setup with nothing but bash: the same back ends and QEMU on fresh disks of the recorded sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

from images import ImageInfo
from lab.errors import LabError

MANIFEST = "manifest.json"
REPRO = "repro.sh"
SCHEMA = 1
_HOSTFWD = re.compile(r"(hostfwd=tcp:127\.0\.0\.1:)\d+(-:22)")
_NOT_DISKS = (".log", ".jsonl", ".json", ".cmdline", ".sh")


@functools.lru_cache(maxsize=None)
def qemu_version(qemu: str = "qemu-system-x86_64") -> str:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return out.splitlines()[0].strip() if out else "unknown"


@dataclasses.dataclass
class Manifest:
    kind: str  # "lab" (lab up) or "scenario" (a pytest node)
    name: str  # the lab's name or the test's node id
    workdir: str  # the directory every relative path below lived in
    rootdir: str  # the checkout that ran it
    image: dict[str, str]  # ImageInfo.to_json(): recipe_hash, kernel, rootfs, key, ...
    accel: str = ""
    qemu_version: str = ""
    machines: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # name, argv, workdir
    backends: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # kind, argv, socket, log
    disks: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # path, size
    seeds: dict[str, int] = dataclasses.field(default_factory=dict)
    workloads: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)  # test parameters, lab up options
    outcome: dict[str, Any] | None = None  # scenario: passed/failed, phase, message
    created: str = dataclasses.field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    schema: int = SCHEMA

    @property
    def image_recipe_hash(self) -> str:
        return self.image.get("recipe_hash", "")

    def image_info(self) -> ImageInfo:
        paths = {k: Path(v) for k, v in self.image.items() if k in ("kernel", "initrd", "rootfs", "key")}
        missing = [str(p) for p in paths.values() if not p.exists()]
        if missing:
            raise LabError(f"the recorded guest image is gone ({missing[0]}); rebuild recipe {self.image_recipe_hash}")
        return ImageInfo(**{**self.image, **paths})

    def add_machine(self, name: str, argv: list[str], workdir: Path, accel: str) -> None:
        self.machines = [m for m in self.machines if m["name"] != name]
        self.machines.append({"name": name, "argv": list(argv), "workdir": str(workdir)})
        self.accel = accel

    def add_backend(self, kind: str, argv: list[str], socket: str, log: Path) -> None:
        self.backends = [b for b in self.backends if b["socket"] != socket]
        self.backends.append({"kind": kind, "argv": list(argv), "socket": socket, "log": str(log)})

    def find_disks(self) -> None:
        """The regular files under workdir that the command lines name (logs aside), by size."""
        root = re.escape(self.workdir.rstrip("/"))
        seen: dict[str, int] = {}
        for argv in [m["argv"] for m in self.machines] + [b["argv"] for b in self.backends]:
            for arg in argv:
                for path in re.findall(root + r"/[^,=\s]+", arg):
                    p = Path(path)
                    if p.suffix not in _NOT_DISKS and p.is_file():
                        seen[path] = p.stat().st_size
        self.disks = [{"path": path, "size": size} for path, size in sorted(seen.items())]

    def write(self, directory: Path | None = None) -> Path:
        """manifest.json and repro.sh in `directory` (default: workdir); the manifest's path."""
        directory = Path(directory or self.workdir)
        self.find_disks()
        path = directory / MANIFEST
        temporary = directory / (MANIFEST + ".tmp")
        temporary.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        temporary.replace(path)
        script = directory / REPRO
        script.write_text(repro_script(self))
        script.chmod(0o755)
        return path


def load(path: Path | str) -> Manifest:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LabError(f"no manifest at {path}") from None
    except (OSError, ValueError) as exc:
        raise LabError(f"{path} is not a manifest: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise LabError(f"{path} is not a lab manifest (schema {SCHEMA})")
    try:
        return Manifest(**data)
    except TypeError as exc:
        raise LabError(f"{path}: damaged manifest ({exc})") from None


def signature(message: str) -> str:
    """A failure's first line without the run's private paths: equal for the same failure."""
    first = (message.strip().splitlines() or [""])[0]
    return re.sub(r"/tmp/(lab|pytest)[^\s:'\"]*", "<tmp>", first)


def relocate(text: str, old: str, new: str) -> str:
    return text.replace(old.rstrip("/"), str(new).rstrip("/"))


def relocated_argv(argv: list[str], old: str, new: Path) -> list[str]:
    return [relocate(a, old, str(new)) for a in argv]


def _shell_word(arg: str, workdir: str) -> str:
    """`arg` as one shell word in which the work directory is "$W" and the SSH port "$PORT"."""
    marked = _HOSTFWD.sub(lambda m: f"{m.group(1)}\0PORT\0{m.group(2)}", arg)
    pieces = re.split(f"({re.escape(workdir.rstrip('/'))}|\0PORT\0)", marked)
    words = []
    for piece in pieces:
        if piece == workdir.rstrip("/"):
            words.append('"$W"')
        elif piece == "\0PORT\0":
            words.append('"$PORT"')
        elif piece:
            words.append(shlex.quote(piece))
    return "".join(words) or "''"


def _command(argv: list[str], workdir: str) -> str:
    return " ".join(_shell_word(a, workdir) for a in argv)


def repro_script(m: Manifest) -> str:
    """A bash script that starts the recorded back ends and QEMU again, in a fresh directory."""
    w = m.workdir
    lines = [
        "#!/usr/bin/env bash",
        f"# Replays the setup of {m.kind} {m.name} (recorded {m.created}) without pytest:",
        "# the same back end and QEMU command lines, in a fresh directory, on fresh zeroed disks",
        "# of the recorded sizes. The guest stays up until it powers off or you press Ctrl-C;",
        "# everything started here is stopped on exit. `lab repro manifest.json` also replays",
        "# the recorded workloads and checks them.",
        f"# QEMU: {m.qemu_version}; accelerator: {m.accel}; image recipe: {m.image_recipe_hash}",
        f"# seeds: {json.dumps(m.seeds)}",
        "set -euo pipefail",
        'W=$(mktemp -d /tmp/lab-repro-XXXXXX)',
        'echo "work dir: $W"',
        "pids=()",
        "cleanup() {",
        '  for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done',
        "  sleep 2",
        '  for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done',
        "}",
        "trap cleanup EXIT",
        "trap 'exit 130' INT TERM",
        "wait_socket() {",
        '  for _ in $(seq 300); do [ -S "$1" ] && return 0; sleep 0.1; done',
        '  echo "no socket $1 after 30 s; log: $2" >&2; tail -n 20 "$2" >&2; exit 1',
        "}",
    ]
    for machine in m.machines:
        lines.append(f"mkdir -p {_shell_word(machine['workdir'], w)}")
    for disk in m.disks:
        lines.append(f"truncate -s {disk['size']} {_shell_word(disk['path'], w)}")
    lines.append(f"cd {shlex.quote(m.rootdir)}")
    for backend in m.backends:
        log = _shell_word(backend["log"], w)
        lines.append(f"setsid {_command(backend['argv'], w)} >{log} 2>&1 </dev/null &")
        lines.append("pids+=($!)")
        lines.append(f"wait_socket {_shell_word(backend['socket'], w)} {log}")
    for machine in m.machines:
        workdir = _shell_word(machine["workdir"], w)
        lines.append(
            "PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind((\"127.0.0.1\", 0)); "
            "print(s.getsockname()[1])')"
        )
        lines.append(f"(cd {workdir} && exec setsid {_command(machine['argv'], w)} >{workdir}/qemu.log 2>&1 </dev/null) &")
        lines.append("pids+=($!)")
        key = shlex.quote(m.image.get("key", "KEY"))
        lines.append(
            f'echo "{machine["name"]}: ssh -i {key} -p $PORT -o StrictHostKeyChecking=no '
            f'-o UserKnownHostsFile=/dev/null root@127.0.0.1   console log: {workdir}/console.log"'
        )
    lines.append('wait "${pids[@]: -1}"')
    return "\n".join(lines) + "\n"
