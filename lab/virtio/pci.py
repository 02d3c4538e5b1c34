"""virtio-pci from a userspace process inside a guest: the Transport over sysfs and mapped BARs.

The PCI function is taken from its kernel driver (virtio-pci) and given back on close, when it
is rebound and the kernel probes it afresh. Config space goes through the sysfs `config` file
(pread/pwrite of the register's width: the kernel turns an aligned 2- or 4-byte access into one
config cycle); the modern virtio capabilities say where in which BAR the common, notify and
device-specific regions are; the BARs are mmapped from `resourceN`. QEMU dispatches those
registers by exact offset and width, so every register is read and written in one access of
its natural width through memoryview casts (a byte-slice store would reach it as byte writes).

No interrupts: MSI-X stays off, INTx is disabled, every queue has NO_VECTOR and the driver
polls used rings. DMA memory is hugepages (dma.py); the device sees guest-physical addresses.
Transitional devices (1af4:1000-103f) are driven through their modern interface; legacy-only
ones (no modern capabilities, e.g. disable-modern=on) are refused.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from . import VirtioError
from .dma import DmaMemory
from .transport import DmaBuffer, Transport

SYSFS = Path("/sys/bus/pci/devices")
DRIVERS = Path("/sys/bus/pci/drivers")
KERNEL_DRIVER = "virtio-pci"
LOCK_DIR = "/run/labvirtio"
VENDOR_VIRTIO = 0x1AF4
MODERN_BASE = 0x1040
TRANSITIONAL = {0x1000: 1, 0x1001: 2, 0x1002: 5, 0x1003: 3, 0x1004: 8, 0x1005: 4, 0x1009: 9}
TYPE_NAMES = {1: "net", 2: "blk", 3: "console", 4: "rng", 5: "balloon", 8: "scsi", 9: "9p", 16: "gpu",
              18: "input", 19: "vsock", 26: "fs"}

# PCI config space
CFG_COMMAND = 0x04
CFG_STATUS = 0x06
CFG_CAP_PTR = 0x34
COMMAND_MEMORY = 0x2
COMMAND_MASTER = 0x4
COMMAND_INTX_DISABLE = 0x400
STATUS_CAP_LIST = 0x10
CAP_ID_VENDOR = 0x09
MAX_CAPS = 48  # a loop guard: 256 bytes hold at most 48 capabilities

# virtio_pci_cap cfg_type
CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG = 1, 2, 3, 4, 5
_CAP = struct.Struct("<BBBBBB2xII")  # vndr, next, len, cfg_type, bar, id, pad, offset, length

# common config registers (offset, as the spec lays them out)
DFSELECT, DF, GFSELECT, GF = 0x00, 0x04, 0x08, 0x0C
MSIX_CONFIG, NUM_QUEUES, DEVICE_STATUS, CONFIG_GENERATION = 0x10, 0x12, 0x14, 0x15
Q_SELECT, Q_SIZE, Q_MSIX, Q_ENABLE, Q_NOTIFY_OFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
Q_DESC, Q_DRIVER, Q_DEVICE = 0x20, 0x28, 0x30
COMMON_SIZE = 0x38
NO_VECTOR = 0xFFFF
RESET_TIMEOUT = 5.0

_BDF = re.compile(r"^(?:([0-9a-f]{4}):)?([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$")
_ID = re.compile(r"^([0-9a-f]{4}):([0-9a-f]{4})$")


def require_root() -> None:
    if os.geteuid() != 0:
        raise VirtioError("must run as root (PCI config writes, BAR mappings and /proc/self/pagemap need it)")


def _sysfs_int(path: Path) -> int:
    return int(path.read_text().strip(), 16)


@dataclass(frozen=True)
class PciFunction:
    """One PCI function as sysfs shows it."""

    bdf: str
    vendor: int
    device: int
    subsystem_device: int

    @classmethod
    def at(cls, bdf: str) -> PciFunction:
        path = SYSFS / bdf
        try:
            return cls(bdf, _sysfs_int(path / "vendor"), _sysfs_int(path / "device"),
                       _sysfs_int(path / "subsystem_device"))
        except FileNotFoundError:
            raise VirtioError(f"no PCI device at {bdf}") from None

    @property
    def path(self) -> Path:
        return SYSFS / self.bdf

    @property
    def id(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"

    @property
    def virtio_type(self) -> int | None:
        if self.vendor != VENDOR_VIRTIO:
            return None
        if MODERN_BASE <= self.device <= 0x107F:
            return self.device - MODERN_BASE
        if 0x1000 <= self.device < MODERN_BASE:
            return TRANSITIONAL.get(self.device, self.subsystem_device)
        return None

    @property
    def kind(self) -> str:
        vtype = self.virtio_type
        return "-" if vtype is None else TYPE_NAMES.get(vtype, f"type{vtype}")

    @property
    def transitional(self) -> bool:
        return self.vendor == VENDOR_VIRTIO and self.device < MODERN_BASE

    def driver(self) -> str | None:
        link = self.path / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def block_devices(self) -> list[str]:
        """Names of the kernel's block devices (and partitions) that live on this function."""
        names = []
        for root, dirs, _files in os.walk(self.path):
            if os.path.basename(root) == "block":
                for name in dirs:
                    names.append(name)
                    names += [p for p in os.listdir(os.path.join(root, name)) if p.startswith(name)]
                dirs.clear()
        return sorted(names)


def normalize_bdf(text: str) -> str | None:
    match = _BDF.match(text.lower())
    if match is None:
        return None
    domain, bus, slot, function = match.groups()
    return f"{domain or '0000'}:{bus}:{slot}.{function}"


def list_functions(virtio_only: bool = True) -> list[PciFunction]:
    functions = [PciFunction.at(p.name) for p in sorted(SYSFS.iterdir())]
    return [f for f in functions if f.virtio_type is not None or not virtio_only]


def find(selector: str) -> PciFunction:
    """The function at a BDF (`0000:00:10.0`, `00:10.0`) or the only one with `vendor:device`."""
    bdf = normalize_bdf(selector)
    if bdf is not None:
        return PciFunction.at(bdf)
    match = _ID.match(selector.lower())
    if match is None:
        raise VirtioError(f"{selector!r} is neither a PCI address (0000:00:10.0) nor a vendor:device id (1af4:1042)")
    vendor, device = (int(part, 16) for part in match.groups())
    found = [f for f in list_functions(virtio_only=False) if (f.vendor, f.device) == (vendor, device)]
    if not found:
        raise VirtioError(f"no PCI device with id {selector}")
    if len(found) > 1:
        raise VirtioError(f"{len(found)} PCI devices with id {selector} ({', '.join(f.bdf for f in found)}): give a BDF")
    return found[0]


@dataclass(frozen=True)
class VirtioCap:
    cfg_type: int
    bar: int
    offset: int
    length: int
    notify_multiplier: int = 0


def virtio_caps(config: bytes) -> dict[int, VirtioCap]:
    """The first vendor capability of each cfg_type (the spec lets a driver use the first)."""
    caps: dict[int, VirtioCap] = {}
    if len(config) < 64 or not struct.unpack_from("<H", config, CFG_STATUS)[0] & STATUS_CAP_LIST:
        return caps
    pointer = config[CFG_CAP_PTR] & 0xFC
    for _ in range(MAX_CAPS):
        if pointer < 0x40 or pointer + _CAP.size > len(config):
            break
        vndr, nxt, length, cfg_type, bar, _id, offset, size = _CAP.unpack_from(config, pointer)
        if vndr == CAP_ID_VENDOR and length >= _CAP.size and bar <= 5 and cfg_type not in caps:
            multiplier = struct.unpack_from("<I", config, pointer + 16)[0] if cfg_type == CAP_NOTIFY else 0
            caps[cfg_type] = VirtioCap(cfg_type, bar, offset, size, multiplier)
        pointer = nxt & 0xFC
    return caps


class PciTransport(Transport):
    """The ops table over one virtio-pci function, detached from its kernel driver."""

    def __init__(self, selector: str, hugepages: int = 16, timeout: float = RESET_TIMEOUT) -> None:
        require_root()
        self.function = find(selector)
        self.bdf = self.function.bdf
        self.timeout = timeout
        if self.function.virtio_type is None:
            raise VirtioError(f"{self.bdf} ({self.function.id}) is not a virtio device")
        self._lock_fd: int | None = None
        self._config_fd: int | None = None
        self._rebind: str | None = None
        self._command: int | None = None
        self._maps: list[mmap.mmap] = []
        self._views: list[memoryview] = []
        self._notify_at: dict[int, int] = {}
        self._common: memoryview | None = None
        self.dma: DmaMemory | None = None
        try:
            self._lock()
            self._config_fd = os.open(self.function.path / "config", os.O_RDWR)
            config = os.pread(self._config_fd, 4096, 0)
            self.caps = virtio_caps(config)
            missing = [name for t, name in ((CAP_COMMON, "common"), (CAP_NOTIFY, "notify"), (CAP_DEVICE, "device"))
                       if t not in self.caps]
            if missing:
                raise VirtioError(
                    f"{self.bdf} ({self.function.id}) is a legacy-only virtio device (no modern {'/'.join(missing)} "
                    "capability): give QEMU disable-modern=off (and disable-legacy=on)"
                )
            self._detach()
            self._command = self._config_read(CFG_COMMAND, 2)
            self._config_write(CFG_COMMAND, 2, self._command | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_INTX_DISABLE)
            self._map_regions()
            self.dma = DmaMemory(hugepages)
        except BaseException:
            self.close()
            raise

    # ---- setup ------------------------------------------------------------------------------

    def _lock(self) -> None:
        os.makedirs(LOCK_DIR, exist_ok=True)
        fd = os.open(f"{LOCK_DIR}/{self.bdf}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VirtioError(f"{self.bdf} is in use by another labvirtio process") from None
        self._lock_fd = fd

    def _detach(self) -> None:
        driver = self.function.driver()
        if driver is None:
            return
        if driver != KERNEL_DRIVER:
            raise VirtioError(f"{self.bdf} is bound to {driver}, not {KERNEL_DRIVER}: unbind it first")
        for name in self.function.block_devices():
            try:
                os.close(os.open(f"/dev/{name}", os.O_RDONLY | os.O_EXCL))
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise VirtioError(f"{self.bdf} is in use: /dev/{name} is mounted or held; not detaching it") from None
                raise
        (self.function.path / "driver" / "unbind").write_text(self.bdf)
        self._rebind = driver

    def _map_regions(self) -> None:
        bars: dict[int, memoryview] = {}
        for cap in self.caps.values():
            if cap.cfg_type not in (CAP_COMMON, CAP_NOTIFY, CAP_DEVICE) or cap.bar in bars:
                continue
            path = self.function.path / f"resource{cap.bar}"
            try:
                fd = os.open(path, os.O_RDWR | os.O_SYNC)
            except FileNotFoundError:
                raise VirtioError(f"{self.bdf}: BAR {cap.bar} has no resource file") from None
            try:
                size = os.fstat(fd).st_size
                self._maps.append(mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
            except OSError as exc:
                raise VirtioError(f"{self.bdf}: cannot map BAR {cap.bar} (an I/O port BAR?): {exc.strerror}") from None
            finally:
                os.close(fd)
            bars[cap.bar] = self._keep(memoryview(self._maps[-1]))

        def region(cfg_type: int, minimum: int) -> memoryview:
            cap = self.caps[cfg_type]
            bar = bars[cap.bar]
            if cap.length < minimum or cap.offset + cap.length > len(bar):
                raise VirtioError(
                    f"{self.bdf}: capability {cfg_type} [{cap.offset:#x}, +{cap.length:#x}) does not fit "
                    f"BAR {cap.bar} of {len(bar):#x} bytes (or is shorter than {minimum})"
                )
            return self._keep(bar[cap.offset : cap.offset + cap.length])

        common = region(CAP_COMMON, COMMON_SIZE)
        self._c8 = common
        self._c16 = self._keep(common[: len(common) & ~1].cast("H"))
        self._c32 = self._keep(common[: len(common) & ~3].cast("I"))
        self._common = common
        notify = region(CAP_NOTIFY, 2)
        self._notify16 = self._keep(notify[: len(notify) & ~1].cast("H"))
        self._notify_multiplier = self.caps[CAP_NOTIFY].notify_multiplier
        device = region(CAP_DEVICE, 1)
        self._d8 = device
        self._d16 = self._keep(device[: len(device) & ~1].cast("H"))
        self._d32 = self._keep(device[: len(device) & ~3].cast("I"))

    def _keep(self, view: memoryview) -> memoryview:
        self._views.append(view)
        return view

    # ---- config space through sysfs ---------------------------------------------------------

    def _config_read(self, offset: int, width: int) -> int:
        return int.from_bytes(os.pread(self._config_fd, width, offset), "little")

    def _config_write(self, offset: int, width: int, value: int) -> None:
        if os.pwrite(self._config_fd, value.to_bytes(width, "little"), offset) != width:
            raise VirtioError(f"{self.bdf}: short config write at {offset:#x}")

    # ---- Transport --------------------------------------------------------------------------

    def device_features(self) -> int:
        c32 = self._c32
        c32[DFSELECT >> 2] = 0
        low = c32[DF >> 2]
        c32[DFSELECT >> 2] = 1
        return low | c32[DF >> 2] << 32

    def set_driver_features(self, features: int) -> None:
        c32 = self._c32
        c32[GFSELECT >> 2] = 0
        c32[GF >> 2] = features & 0xFFFFFFFF
        c32[GFSELECT >> 2] = 1
        c32[GF >> 2] = features >> 32 & 0xFFFFFFFF

    def get_status(self) -> int:
        return self._c8[DEVICE_STATUS]

    def set_status(self, status: int) -> None:
        self._c8[DEVICE_STATUS] = status
        if status:
            return
        deadline = time.monotonic() + self.timeout
        while self._c8[DEVICE_STATUS]:
            if time.monotonic() > deadline:
                raise VirtioError(f"{self.bdf}: device status still {self._c8[DEVICE_STATUS]:#x} {self.timeout}s after reset")
            time.sleep(0.001)

    def config_generation(self) -> int:
        return self._c8[CONFIG_GENERATION]

    def read_config(self, offset: int, size: int) -> bytes:
        self._check_config(offset, size)
        out = bytearray(size)
        pos, end = offset, offset + size
        while pos < end:
            if not pos & 3 and end - pos >= 4:
                struct.pack_into("<I", out, pos - offset, self._d32[pos >> 2])
                pos += 4
            elif not pos & 1 and end - pos >= 2:
                struct.pack_into("<H", out, pos - offset, self._d16[pos >> 1])
                pos += 2
            else:
                out[pos - offset] = self._d8[pos]
                pos += 1
        return bytes(out)

    def write_config(self, offset: int, data: bytes) -> None:
        self._check_config(offset, len(data))
        pos, end = offset, offset + len(data)
        while pos < end:
            if not pos & 3 and end - pos >= 4:
                self._d32[pos >> 2] = struct.unpack_from("<I", data, pos - offset)[0]
                pos += 4
            elif not pos & 1 and end - pos >= 2:
                self._d16[pos >> 1] = struct.unpack_from("<H", data, pos - offset)[0]
                pos += 2
            else:
                self._d8[pos] = data[pos - offset]
                pos += 1

    def _check_config(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > len(self._d8):
            raise VirtioError(f"{self.bdf}: config access [{offset}, +{size}) outside the {len(self._d8)} B device region")

    def num_queues(self) -> int:
        return self._c16[NUM_QUEUES >> 1]

    def queue_max_size(self, index: int) -> int:
        if not 0 <= index < self.num_queues():
            return 0
        self._c16[Q_SELECT >> 1] = index
        return self._c16[Q_SIZE >> 1]

    def setup_queue(self, index: int, size: int, desc: int, avail: int, used: int) -> None:
        c16, c32 = self._c16, self._c32
        c16[Q_SELECT >> 1] = index
        c16[Q_SIZE >> 1] = size
        if c16[Q_SIZE >> 1] != size:
            raise VirtioError(f"{self.bdf}: queue {index} did not take size {size}")
        for register, addr in ((Q_DESC, desc), (Q_DRIVER, avail), (Q_DEVICE, used)):
            c32[register >> 2] = addr & 0xFFFFFFFF
            c32[(register >> 2) + 1] = addr >> 32
        c16[Q_MSIX >> 1] = NO_VECTOR
        offset = c16[Q_NOTIFY_OFF >> 1] * self._notify_multiplier
        if offset + 2 > len(self._notify16) * 2 or offset & 1:
            raise VirtioError(f"{self.bdf}: queue {index} notify offset {offset:#x} is outside the notify region")
        self._notify_at[index] = offset >> 1

    def enable_queue(self, index: int) -> None:
        self._c16[Q_SELECT >> 1] = index
        self._c16[Q_ENABLE >> 1] = 1

    def notify(self, index: int) -> None:
        self._notify16[self._notify_at[index]] = index

    def alloc_dma(self, size: int, align: int = 4096) -> DmaBuffer:
        return self.dma.alloc(size, align)

    def free_dma(self, buffer: DmaBuffer) -> None:
        self.dma.free(buffer)

    def wait(self, index: int, timeout: float) -> bool:
        os.sched_yield()  # no interrupts here: give the CPU away briefly, the caller polls again
        return False

    def describe(self) -> dict[str, object]:
        """Where the regions are, for `info`."""
        return {
            "bdf": self.bdf,
            "id": self.function.id,
            "kind": self.function.kind,
            "transitional": self.function.transitional,
            "regions": {
                name: {"bar": cap.bar, "offset": cap.offset, "length": cap.length}
                for name, cap in (("common", self.caps.get(CAP_COMMON)), ("notify", self.caps.get(CAP_NOTIFY)),
                                  ("isr", self.caps.get(CAP_ISR)), ("device", self.caps.get(CAP_DEVICE)))
                if cap is not None
            },
            "notify_multiplier": self._notify_multiplier,
            "hugepages": self.dma.pages if self.dma else 0,
            "hugepages_contiguous_extents": len(self.dma.extents) if self.dma else 0,
        }

    def close(self) -> None:
        """Reset the device, release memory and mappings, give the function back to the kernel."""
        problems: list[str] = []
        if self._common is not None:
            try:
                self.set_status(0)
            except VirtioError as exc:
                problems.append(str(exc))
            self._common = None
        if self.dma is not None:
            self.dma.close()
            self.dma = None
        for view in reversed(self._views):
            view.release()
        self._views = []
        for mapping in self._maps:
            mapping.close()
        self._maps = []
        if self._command is not None:
            self._config_write(CFG_COMMAND, 2, self._command)
            self._command = None
        if self._config_fd is not None:
            os.close(self._config_fd)
            self._config_fd = None
        if self._rebind is not None:
            driver, self._rebind = self._rebind, None
            try:
                (DRIVERS / driver / "bind").write_text(self.bdf)
            except OSError as exc:
                problems.append(f"{self.bdf}: giving it back to {driver} failed: {exc.strerror}")
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if problems:
            raise VirtioError("; ".join(problems))
