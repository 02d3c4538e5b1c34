"""A QEMU guest built from data: config -> argv -> process -> ready guest -> stepwise teardown.

Callers describe extra hardware as `Option`s (chardevs, objects, blockdevs, devices); the
machine adds the fixed parts every lab guest has: shared memfd RAM (vhost-user needs it), PVH
direct kernel boot, the read-only root disk, user networking with an SSH port forward, the
serial console (socket + logfile) and QMP. Everything lands in the machine's workdir.
"""

from __future__ import annotations

import atexit
import dataclasses
import fcntl
import logging
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from images import READY_MARKER, ROOT_SERIAL, ImageInfo
from lab.errors import LabError, TimeoutExpired
from lab.guest.ssh import GuestSSH
from lab.qemu import accel as accel_mod
from lab.qemu import process
from lab.qemu.console import Console, tail, wait_for_line
from lab.qemu.qmp import QMP

log = logging.getLogger(__name__)

Value = str | int | bool | Path

# Base timeouts in seconds, sized for KVM; multiplied by the accelerator's timeout_scale.
QMP_UP_SECONDS = 10.0
MARKER_SECONDS = 20.0
SSH_AFTER_MARKER_SECONDS = 10.0
QUIT_SECONDS = 5.0
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the NUL
_HOSTFWD_RETRIES = 3


@dataclasses.dataclass(frozen=True)
class Option:
    """One QEMU option such as `-device virtio-blk-pci,drive=d0,serial=x`."""

    flag: str  # "-device", "-object", "-chardev", "-blockdev", ...
    head: str | None  # the leading positional value (driver, qom type, backend), if any
    props: tuple[tuple[str, Value], ...] = ()

    def argv(self) -> list[str]:
        parts = [] if self.head is None else [_escape(self.head)]
        parts += [f"{key}={_render(value)}" for key, value in self.props]
        return [self.flag, ",".join(parts)]


def _render(value: Value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return _escape(str(value))


def _escape(text: str) -> str:
    # QEMU's option syntax doubles commas inside a value.
    return text.replace(",", ",,")


def option(
    flag: str, head: str | None = None, props: Mapping[str, Value] | None = None, **kw: Value
) -> Option:
    """Any option; `props` takes keys that are not identifiers (e.g. "file.filename")."""
    return Option(flag, head, tuple({**(props or {}), **kw}.items()))


# Property names are QEMU's, verbatim: hyphenated ones ("num-queues") go in `props`.
def device(driver: str, props: Mapping[str, Value] | None = None, **kw: Value) -> Option:
    return option("-device", driver, props, **kw)


def qom_object(qom_type: str, props: Mapping[str, Value] | None = None, **kw: Value) -> Option:
    return option("-object", qom_type, props, **kw)


def chardev(backend: str, props: Mapping[str, Value] | None = None, **kw: Value) -> Option:
    return option("-chardev", backend, props, **kw)


def image_blockdev(
    node: str, path: Path, read_only: bool = False, fmt: str = "raw", unmap: bool = False
) -> Option:
    """A block node on an image file (read-only is inherited by the file node); with `unmap`,
    the guest's discards punch holes in the file."""
    props: dict[str, Value] = {"driver": fmt, "node-name": node, "read-only": read_only}
    if unmap:
        props["discard"] = "unmap"
    return option("-blockdev", None, {**props, "file.driver": "file", "file.filename": path})


def virtio_blk_disk(
    node: str, path: Path, serial: str, read_only: bool = False, fmt: str = "raw"
) -> list[Option]:
    """QEMU's built-in virtio-blk-pci on an image file."""
    return [image_blockdev(node, path, read_only, fmt), device("virtio-blk-pci", drive=node, serial=serial)]


@dataclasses.dataclass(frozen=True)
class ScsiHd:
    """One scsi-hd of QEMU's built-in virtio-scsi-pci: target:lun on a raw image."""

    target: int
    lun: int
    image: Path
    read_only: bool = False
    serial: str | None = None  # VPD page 0x80 exists only with a serial


def virtio_scsi_disks(controller: str, disks: Iterable[ScsiHd], num_queues: int = 1) -> list[Option]:
    """QEMU's built-in virtio-scsi-pci with a scsi-hd for each of `disks`."""
    options = [device("virtio-scsi-pci", id=controller, num_queues=num_queues)]
    for disk in disks:
        node = f"{controller}-{disk.target}-{disk.lun}"
        props: dict[str, Value] = {"bus": f"{controller}.0", "scsi-id": disk.target, "lun": disk.lun}
        if disk.serial is not None:
            props["serial"] = disk.serial
        options += [image_blockdev(node, disk.image, disk.read_only, unmap=True), device("scsi-hd", props, drive=node)]
    return options


def vhost_user_blk_disk(
    chardev_id: str, socket: str | Path, num_queues: int, reconnect: int | None = None
) -> list[Option]:
    """A vhost-user-blk-pci whose back end is a separate process listening on `socket`; with
    `reconnect` (seconds), QEMU reconnects to a back end that went away and replays inflight I/O."""
    props: dict[str, Value] = {} if reconnect is None else {"reconnect": reconnect}
    return [
        chardev("socket", props, id=chardev_id, path=socket),
        device("vhost-user-blk-pci", {"num-queues": num_queues}, chardev=chardev_id),
    ]


def vhost_user_scsi_disk(chardev_id: str, socket: str | Path, num_queues: int) -> list[Option]:
    """A vhost-user-scsi-pci whose back end is a separate process listening on `socket`.

    QEMU's num_queues (request queues) defaults to the vCPU count: it is set explicitly because
    it must not exceed the request queues the back end offers."""
    return [
        chardev("socket", id=chardev_id, path=socket),
        device("vhost-user-scsi-pci", chardev=chardev_id, num_queues=num_queues),
    ]


def create_raw_image(path: Path, size_mib: int) -> Path:
    """A sparse raw disk image (scratch disks for guest-side I/O)."""
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    return path


def at_pci_slot(options: Iterable[Option], slot: int) -> list[Option]:
    """`options` of one PCI device (the first -device; scsi-hd devices after it sit on its bus)
    placed at 0000:00:SLOT.0 (pci_address(slot)), so a guest-side driver finds it at a known
    address. Slots 1-3 hold the fixed devices."""
    options = list(options)
    first = next((i for i, opt in enumerate(options) if opt.flag == "-device"), None)
    if first is None or not 4 <= slot <= 0x1E:
        raise LabError(f"at_pci_slot needs a -device and a slot in 4..0x1e (slot {slot:#x})")
    placed = options[first]
    options[first] = dataclasses.replace(placed, props=(*placed.props, ("addr", f"{slot:#04x}")))
    return options


def pci_address(slot: int) -> str:
    """The guest's BDF of a device placed with at_pci_slot."""
    return f"0000:00:{slot:02x}.0"


@dataclasses.dataclass
class MachineConfig:
    name: str
    image: ImageInfo
    workdir: Path
    mem_mib: int = 512
    smp: int = 2
    options: list[Option] = dataclasses.field(default_factory=list)
    cmdline_extra: str = ""  # appended to the image's kernel command line (e.g. hugepages=64)
    accel: accel_mod.Accel | None = None  # None: $LAB_ACCEL / probed
    qemu: str = "qemu-system-x86_64"
    # A migration destination: `-incoming VALUE` ("defer": wait for migrate-incoming). Its guest
    # arrives by migration, so wait_ready() waits only for SSH, not for a boot.
    incoming: str | None = None
    detached: bool = False  # QEMU may outlive this process (`lab up`): see Machine.release()
    # A recorded command line run verbatim instead of one built from this config (`lab repro`);
    # only its SSH port forward is replaced by a fresh port.
    recorded_argv: tuple[str, ...] | None = None

    def path(self, name: str) -> Path:
        return Path(self.workdir) / name

    def socket_path(self, name: str) -> Path:
        path = self.path(name)
        if len(str(path)) > _UNIX_PATH_MAX:
            raise LabError(f"unix socket path longer than {_UNIX_PATH_MAX} bytes: {path}")
        return path


# QEMU 7.2 under TCG loses guest writes from migration's dirty log when a RAM block is a whole
# number of 64 pages (256 KiB): the bitmap sync's fast path for such blocks clears the dirty bits
# without resetting the vCPUs' TLB entries, so writes through cached entries are never marked
# dirty again and the destination gets stale pages (its kernel oopses right after the resume).
# Fixed upstream in QEMU 9.0 (commit 03bfc2188f, "physmem: Fix migration dirty bitmap coherency
# with TCG memory access"). 8 KiB more (QEMU's -m granularity) sends every sync through the
# per-page path, which does reset the TLBs. KVM keeps its own dirty log and the exact size.
_TCG_RAM_PAD_KIB = 8


def ram_size(mem_mib: int, accel: accel_mod.Accel) -> str:
    """Guest RAM as QEMU's size string, for both the memory backend and -m."""
    if accel.name == "tcg":
        return f"{(mem_mib << 10) + _TCG_RAM_PAD_KIB}K"
    return f"{mem_mib}M"


def build_argv(config: MachineConfig, accel: accel_mod.Accel, ssh_port: int, ssh_address: str = "127.0.0.1") -> list[str]:
    """The complete QEMU command line for `config` (pure: no files or processes touched); the
    guest's SSH is forwarded from `ssh_address`:`ssh_port` (port 0: QEMU picks one)."""
    if config.recorded_argv is not None:
        return with_ssh_port(config.recorded_argv, ssh_port)
    image = config.image
    cmdline = " ".join(filter(None, [image.cmdline, config.cmdline_extra]))
    ram = ram_size(config.mem_mib, accel)
    fixed = [
        qom_object("memory-backend-memfd", id="mem", size=ram, share=True),
        chardev(
            "socket",
            id="console",
            path=config.socket_path("console.sock"),
            server=True,
            wait=False,
            logfile=config.path("console.log"),
            logappend=True,
        ),
        chardev("socket", id="qmp", path=config.socket_path("qmp.sock"), server=True, wait=False),
        option("-mon", chardev="qmp", mode="control"),
        *virtio_blk_disk("root", image.rootfs, ROOT_SERIAL, read_only=True),
        option("-netdev", "user", id="net0", hostfwd=f"tcp:{ssh_address}:{ssh_port}-:22"),
        # romfile= : PVH boot never uses the NIC's boot ROM, so don't load it.
        device("virtio-net-pci", netdev="net0", romfile=""),
        # sshd waits for the kernel's RNG to be seeded; a virtio-rng seeds it at once (0.8 s)
        device("virtio-rng-pci"),
    ]
    argv = [config.qemu, "-name", config.name, *accel.argv]
    argv += ["-M", "q35,memory-backend=mem,smbus=off,sata=off", "-m", ram]
    argv += ["-smp", str(config.smp), "-nodefaults", "-no-user-config", "-display", "none"]
    argv += ["-no-reboot", "-msg", "timestamp=on"]
    argv += ["-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline]
    argv += ["-serial", "chardev:console"]
    for opt in [*fixed, *config.options]:
        argv += opt.argv()
    if config.incoming is not None:
        argv += ["-incoming", config.incoming]
    return argv


def with_ssh_port(argv: Iterable[str], ssh_port: int) -> list[str]:
    """`argv` with its SSH host forward moved to `ssh_port`."""
    return [re.sub(r"hostfwd=tcp:127\.0\.0\.1:\d+-:22", f"hostfwd=tcp:127.0.0.1:{ssh_port}-:22", a) for a in argv]


class PortLease:
    """A free localhost TCP port for hostfwd, held against other lab processes by a flock.

    The kernel hands out a free port; the lock file keeps parallel workers (pytest-xdist) that
    got the same number before QEMU bound it from both using it.
    """

    def __init__(self) -> None:
        # one fixed place: every lab process on the host must see the same locks, and the
        # hygiene plugin gives each pytest session its own TMPDIR
        lock_dir = Path("/tmp/qemu-lab-ports")
        lock_dir.mkdir(exist_ok=True)
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            lock = open(lock_dir / f"{port}.lock", "w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            self.port, self._lock = port, lock
            return

    def release(self) -> None:
        self._lock.close()


class Machine:
    """One QEMU process. `launch`, `wait_ready`, use `ssh`/`qmp`/`console()`, `shutdown`."""

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self.accel: accel_mod.Accel | None = config.accel
        self.argv: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.qmp: QMP | None = None
        self._ssh: GuestSSH | None = None
        self._port: PortLease | None = None
        self._launched_at = 0.0
        self.boot_seconds: float | None = None  # launch -> SSH answering
        self.returncode: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def launch(self) -> Machine:
        if self.proc is not None:
            raise LabError(f"machine {self.config.name} already launched")
        cfg = self.config
        if shutil.which(cfg.qemu) is None:
            raise LabError(f"QEMU binary not found: {cfg.qemu}")
        if self.accel is None:
            self.accel = accel_mod.choose(cfg.image.kernel, cfg.qemu)
        Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
        for stale in ("qmp.sock", "console.sock"):  # left by an earlier run in this workdir
            cfg.path(stale).unlink(missing_ok=True)
        for attempt in range(_HOSTFWD_RETRIES):
            self._port = PortLease()
            self.argv = build_argv(cfg, self.accel, self._port.port)
            cfg.path("qemu.cmdline").write_text(shlex.join(self.argv) + "\n")
            self._launched_at = time.monotonic()
            self.proc = process.spawn(
                self.argv, log=cfg.path("qemu.log"), cwd=Path(cfg.workdir), detached=cfg.detached
            )
            _LIVE.add(self)
            self.qmp = QMP(cfg.socket_path("qmp.sock"), cfg.path("qmp.jsonl"))
            try:
                self.qmp.connect(self.scaled(QMP_UP_SECONDS), alive=self.alive)
                return self
            except LabError:
                lost_port = "host forwarding rule" in tail(cfg.path("qemu.log"), 5)
                self.shutdown()
                if not lost_port or attempt == _HOSTFWD_RETRIES - 1:
                    raise LabError(
                        f"QEMU for {cfg.name} failed to start: {tail(cfg.path('qemu.log'), 1)}"
                    ) from None
                log.info("ssh port taken before QEMU bound it; relaunching")
                self.proc, self.returncode = None, None
        raise AssertionError("unreachable")

    def wait_ready(self, marker: str = READY_MARKER) -> float:
        """Wait for the console marker, then for SSH; return boot-to-SSH seconds."""
        self._require_running()
        if self.config.incoming is None:
            wait_for_line(self.console_log, marker, self.scaled(MARKER_SECONDS), alive=self.alive)
        try:
            self._ssh = GuestSSH.connect(
                self.ssh_port, self.config.image.key, self.scaled(SSH_AFTER_MARKER_SECONDS)
            )
        except TimeoutExpired as exc:
            raise TimeoutExpired(f"{exc}\nlast console lines:\n{tail(self.console_log)}") from None
        self.boot_seconds = time.monotonic() - self._launched_at
        return self.boot_seconds

    def shutdown(self) -> int | None:
        """QMP quit, then SIGTERM the group, then SIGKILL; always reap. Safe to call again."""
        self._close_ssh()
        if self.proc is not None and self.returncode is None:
            if self.qmp is not None and self.qmp.connected and self.alive():
                self.qmp.quit(timeout=self.scaled(QUIT_SECONDS))
                try:
                    self.proc.wait(timeout=self.scaled(QUIT_SECONDS))
                except subprocess.TimeoutExpired:
                    pass  # SIGTERM, then SIGKILL, take over
            self.returncode = self._stop_group()
        self._forget()
        return self.returncode

    def kill(self) -> int | None:
        """SIGKILL the group at once (a QEMU that cannot quit: vCPUs stuck on missing pages)."""
        self._close_ssh()
        if self.proc is not None and self.returncode is None:
            self.returncode = self._stop_group(term_grace=0)
        self._forget()
        return self.returncode

    def _stop_group(self, term_grace: float = 3.0) -> int:
        """SIGTERM QEMU's process group, SIGKILL after `term_grace`; reaped."""
        return process.stop_group(self.proc, term_grace)

    def release(self) -> None:
        """Let a detached QEMU run on after this process: drop the SSH and QMP connections and
        forget it, without stopping it (its bound port stays its own). Whoever released it
        owns stopping it (lab.labs does, by pid and QMP socket)."""
        if not self.config.detached:
            raise LabError(f"machine {self.config.name} was not launched detached")
        self._forget()

    def _close_ssh(self) -> None:
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None

    def _forget(self) -> None:
        """Drop the SSH and QMP connections and the bound port; no longer one of the live machines."""
        self._close_ssh()
        if self.qmp is not None:
            self.qmp.close()
        if self._port is not None:
            self._port.release()
            self._port = None
        _LIVE.discard(self)

    def __enter__(self) -> Machine:
        return self.launch()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- access ------------------------------------------------------------------------------
    @property
    def ssh(self) -> GuestSSH:
        if self._ssh is None:
            raise LabError(f"machine {self.config.name}: SSH not connected (call wait_ready)")
        return self._ssh

    def console(self, timeout: float = 30.0) -> Console:
        """Attach to the serial console (one client at a time); close it when done."""
        self._require_running()
        return Console(self.config.socket_path("console.sock"), timeout=timeout)

    @property
    def console_log(self) -> Path:
        return self.config.path("console.log")

    @property
    def ssh_port(self) -> int:
        if self._port is None:
            raise LabError(f"machine {self.config.name} is not running")
        return self._port.port

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise LabError(f"machine {self.config.name} was never launched")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def scaled(self, seconds: float) -> float:
        return self.accel.scaled(seconds) if self.accel else seconds

    def _require_running(self) -> None:
        if not self.alive():
            raise LabError(
                f"machine {self.config.name} is not running; "
                f"QEMU log:\n{tail(self.config.path('qemu.log'), 5)}"
            )


# Last line of defence for callers that forget shutdown() (or die in the middle of launch):
# no QEMU outlives the Python process that started it. PDEATHSIG covers SIGKILL of the parent.
_LIVE: set[Machine] = set()


@atexit.register
def _shutdown_all() -> None:
    for machine in list(_LIVE):
        machine.shutdown()


def shutdown_all(machines: Iterable[Machine]) -> list[BaseException]:
    """Shut every machine down even if some fail; return the errors for the caller to report."""
    errors: list[BaseException] = []
    for machine in machines:
        try:
            machine.shutdown()
        except Exception as exc:  # one bad teardown must not leave the others running
            errors.append(exc)
    return errors
