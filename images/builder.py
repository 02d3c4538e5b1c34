"""Builds the guest image described by images/recipe.py into a content-addressed cache.

Layout under $LAB_CACHE (default ~/.cache/qemu-lab):
  images/<recipe hash>/       one complete image: vmlinux, initrd, rootfs.raw, id_ed25519(.pub),
                              stamp.json
  images/.tmp-*               a build in progress (renamed into place when complete)
  rootfs-base/<hash>.tar      mmdebstrap output, keyed by the package list only, so changing an
                              init script rebuilds in seconds
  .lock                       fcntl lock held while building: one builder at a time
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import lzma
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from images import ImageInfo, recipe
from images.cpio import CpioWriter
from lab.errors import LabError
from lab.host import tool

Progress = Callable[[str], None]

STAMP = "stamp.json"
KERNEL = "vmlinux"
INITRD = "initrd"
ROOTFS = "rootfs.raw"
KEY = "id_ed25519"
# Files verified in full on every use; the rootfs is too big for that (see _edge_digest).
SMALL_FILES = (KERNEL, INITRD, KEY, KEY + ".pub")
EDGE = 1 << 20
LOCK_TIMEOUT_S = 30 * 60
TERM_GRACE_S = 15
REBUILD_HINT = "run `lab image build --force`"


def cache_root(cache_dir: Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("LAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "qemu-lab"


def image_dir(cache_dir: Path | None = None) -> Path:
    return cache_root(cache_dir) / "images" / recipe.recipe_hash()


def load_image(directory: Path, deep: bool = False) -> ImageInfo:
    """The ImageInfo of a built image after an integrity check; LabError if it fails.

    The default check reads the rootfs's first and last MiB only; `deep` hashes all of it.
    """
    stamp_path = directory / STAMP
    try:
        stamp = json.loads(stamp_path.read_text())
        for name in SMALL_FILES:
            expect = stamp["files"][name]
            data = (directory / name).read_bytes()
            if len(data) != expect["size"] or _sha256(data) != expect["sha256"]:
                raise ValueError(f"{name} differs from its stamp")
        root = stamp["files"][ROOTFS]
        if (directory / ROOTFS).stat().st_size != root["size"] or _edge_digest(
            directory / ROOTFS
        ) != root["edges"]:
            raise ValueError(f"{ROOTFS} differs from its stamp")
        if deep and _file_sha256(directory / ROOTFS) != root["sha256"]:
            raise ValueError(f"{ROOTFS} differs from its stamp")
        return ImageInfo(
            recipe_hash=stamp["recipe_hash"],
            kernel=directory / KERNEL,
            initrd=directory / INITRD,
            rootfs=directory / ROOTFS,
            key=directory / KEY,
            cmdline=stamp["cmdline"],
            kernel_version=stamp["kernel_version"],
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LabError(
            f"cached guest image {directory} is damaged ({exc}): {REBUILD_HINT}"
        ) from None


def ensure_image(
    cache_dir: Path | None = None, progress: Progress | None = None, force: bool = False
) -> ImageInfo:
    """The image for the current recipe, built first if it is not cached (or if force)."""
    say = progress or (lambda _msg: None)
    root = cache_root(cache_dir)
    files = recipe.guest_files()  # one snapshot names the image and goes into it
    final = root / "images" / recipe.recipe_hash(files)
    if final.is_dir() and not force:
        return load_image(final)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / ".lock", say):
        # another process may have finished the same build while we waited
        if final.is_dir() and not force:
            return load_image(final)
        _remove_leftovers(root)
        work = images / f".tmp-{final.name}-{os.getpid()}"
        work.mkdir()
        try:
            _Build(root, work, say, files).run(final.name)
            if final.is_dir():
                # readers (a running QEMU) keep their open files; the old directory just goes away
                old = images / f".tmp-old-{final.name}-{os.getpid()}"
                final.rename(old)
                _remove_tree(old)
            work.rename(final)
        finally:
            _remove_tree(work)
        _remove_superseded(root, final, say)
    return load_image(final)


@contextmanager
def _exclusive(lock_path: Path, say: Progress) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        announced = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    say("image: another process is building the image; waiting for it")
                    announced = True
                if time.monotonic() > deadline:
                    raise LabError(
                        f"gave up waiting for the image build lock {lock_path}"
                    ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_leftovers(root: Path) -> None:
    """Temp files of interrupted builds; only called with the lock held, so none is live."""
    for pattern in ("images/.tmp-*", "rootfs-base/.tmp-*"):
        for path in root.glob(pattern):
            if path.is_dir():
                _remove_tree(path)
            else:
                path.unlink(missing_ok=True)


def _remove_superseded(root: Path, current: Path, say: Progress) -> None:
    """Builds of older recipes (and their package tarballs) after a new build: each is some
    hundred MiB and nothing uses them again. Only called with the lock held; a guest still
    running from an old image keeps its open files."""
    keep = {current, root / "rootfs-base" / f"{recipe.rootfs_base_hash()}.tar"}
    old = [p for p in (*root.glob("images/*"), *root.glob("rootfs-base/*.tar"))
           if p not in keep and not p.name.startswith(".")]
    for path in old:
        if path.is_dir():
            _remove_tree(path)
        else:
            path.unlink(missing_ok=True)
    if old:
        say(f"image: removed {len(old)} superseded build(s) from {root}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _edge_digest(path: Path) -> str:
    """sha256 of the first and last MiB: catches truncation and overwritten superblocks cheaply."""
    with open(path, "rb") as f:
        head = f.read(EDGE)
        f.seek(max(0, os.fstat(f.fileno()).st_size - EDGE))
        tail = f.read(EDGE)
    return _sha256(head + tail)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _ssh_keygen(key: Path, comment: str) -> None:
    """A new ed25519 key pair without a passphrase: `key` and `key`.pub."""
    _run([tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)])


def _run(
    argv: list[str],
    timeout: float = 300,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run a build tool in its own process group; stop the whole group on any failure."""
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={
            **os.environ,
            "LC_ALL": "C",
            "DEBIAN_FRONTEND": "noninteractive",
            **(env or {}),
        },
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        # TERM first: mmdebstrap then unmounts what it mounted in its chroot and removes it
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if proc.returncode != 0:
        lines = [line for line in err.strip().splitlines() if line.strip()] or [
            "no output"
        ]
        raise LabError(
            f"{Path(argv[0]).name} failed (exit {proc.returncode}): {lines[-1].strip()}"
        )
    return out


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _remove_tree(path: Path) -> None:
    """rmtree that refuses to descend into a mount point (a chroot a killed tool left mounted)."""
    inside = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        mounted = [
            line.split()[1] for line in mounts if line.split()[1].startswith(inside)
        ]
    if mounted:
        raise LabError(
            f"not removing {path}: {mounted[0]} is mounted inside it; unmount it first"
        )
    shutil.rmtree(path, ignore_errors=True)


class _Build:
    """One build into `work`: each step writes its part of the image."""

    def __init__(
        self, root: Path, work: Path, say: Progress, files: recipe.GuestFiles
    ) -> None:
        self.root = root
        self.work = work
        self.say = say
        self.files = files
        self.scratch = (
            work / "scratch"
        )  # deleted at the end: nothing in it is part of the image
        self.scratch.mkdir()

    @contextmanager
    def _step(self, what: str) -> Iterator[None]:
        self.say(f"image: {what} ...")
        start = time.monotonic()
        yield
        self.say(f"image: {what}: done in {time.monotonic() - start:.1f} s")

    def guest_file(self, name: str) -> bytes:
        return recipe.render(self.files[name])

    def run(self, name: str) -> None:
        if os.geteuid() != 0:
            raise LabError(
                "building the guest image needs root (mmdebstrap, root-owned rootfs files)"
            )
        started = time.monotonic()
        with self._step("SSH key pair"):
            self._keypair()
        with self._step("kernel package"):
            kernel_version, tree = self._kernel_package()
        with self._step("vmlinux (PVH direct boot)"):
            self._vmlinux(tree, kernel_version)
        modules = _ModuleTree(tree / "lib" / "modules" / kernel_version)
        with self._step("initramfs"):
            self._initramfs(modules)
        base = self._rootfs_base()
        with self._step("rootfs tree"):
            rootfs = self._rootfs_tree(base, modules, kernel_version)
        with self._step("rootfs ext4 image"):
            self._ext4(rootfs)
        _remove_tree(self.scratch)
        self._stamp(name, kernel_version)
        self.say(f"image: built {name} in {time.monotonic() - started:.1f} s")

    def _keypair(self) -> None:
        _ssh_keygen(self.work / KEY, "root@qemu-lab")

    def _kernel_package(self) -> tuple[str, Path]:
        depends = _run([tool("apt-cache"), "depends", recipe.KERNEL_METAPACKAGE])
        package = next(
            (
                line.split(":", 1)[1].strip()
                for line in depends.splitlines()
                if line.strip().startswith("Depends:") and "linux-image-" in line
            ),
            None,
        )
        if package is None:
            raise LabError(
                f"apt knows no kernel behind {recipe.KERNEL_METAPACKAGE}: run `apt-get update`"
            )
        download = self.scratch / "deb"
        download.mkdir()
        _run([tool("apt-get"), "download", package], cwd=download, timeout=600)
        (deb,) = download.glob("*.deb")
        tree = self.scratch / "kernel"
        _run([tool("dpkg-deb"), "-x", str(deb), str(tree)])
        version = package.removeprefix("linux-image-")
        if not (tree / "lib" / "modules" / version).is_dir():
            raise LabError(f"{package} has no /lib/modules/{version}")
        # the package ships no modules.dep (its postinst makes it): make one to resolve dependencies
        _run([tool("depmod"), "-b", str(tree), version])
        return version, tree

    def _vmlinux(self, tree: Path, version: str) -> None:
        bzimage = (tree / "boot" / f"vmlinuz-{version}").read_bytes()
        target = self.work / KERNEL
        try:
            elf = _bzimage_payload(bzimage)
            if not _has_pvh_note(elf):
                raise ValueError("the ELF has no PVH entry note")
            target.write_bytes(elf)
        except ValueError as exc:
            self.say(f"image: WARNING: booting the bzImage (slower under TCG): {exc}")
            target.write_bytes(bzimage)

    def _initramfs(self, modules: _ModuleTree) -> None:
        modules.check_load_order(recipe.INITRAMFS_MODULES)
        busybox = tool("busybox")
        cpio = CpioWriter()
        for d in ("bin", "dev", "proc", "sys", "modules", "lower", "rw", "newroot"):
            cpio.directory(d)
        cpio.char_device("dev/console", 5, 1)
        cpio.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
        for applet in ("sh", "mount", "insmod", "mkdir", "cat", "sleep", "switch_root"):
            cpio.symlink(f"bin/{applet}", "busybox")
        cpio.file("init", self.guest_file("initramfs-init"), 0o755)
        for name in recipe.INITRAMFS_MODULES:
            cpio.file(f"modules/{name}.ko", modules.path(name).read_bytes(), 0o644)
        # uncompressed: the kernel unpacks these 5 MB in ~30 ms under TCG, while inflating the
        # gzip version (1.8 MB) took ~120 ms and loading it was not measurably faster
        (self.work / INITRD).write_bytes(cpio.finish())

    def _rootfs_base(self) -> Path:
        """The mmdebstrap tarball for the package list, built once per package list."""
        base_dir = self.root / "rootfs-base"
        base_dir.mkdir(parents=True, exist_ok=True)
        tarball = base_dir / f"{recipe.rootfs_base_hash()}.tar"
        if tarball.is_file():
            self.say(f"image: rootfs packages: cached {tarball}")
            return tarball
        partial = base_dir / f".tmp-{tarball.name}"
        # mmdebstrap's own temporary chroot goes in our scratch directory, removed with it
        tmpdir = self.scratch / "mmdebstrap"
        tmpdir.mkdir()
        with self._step(f"rootfs packages: mmdebstrap {recipe.SUITE} (the slow step)"):
            argv = [
                tool("mmdebstrap"),
                "--variant=minbase",
                "--quiet",
                "--include=" + ",".join(recipe.ROOTFS_PACKAGES),
                *(f"--dpkgopt=path-exclude={glob}" for glob in recipe.ROOTFS_EXCLUDES),
                recipe.SUITE,
                str(partial),
                *host_mirrors(recipe.SUITE),
            ]
            try:
                _run(argv, timeout=1800, env={"TMPDIR": str(tmpdir)})
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        partial.rename(tarball)
        return tarball

    def _rootfs_tree(self, base: Path, modules: _ModuleTree, version: str) -> Path:
        rootfs = self.scratch / "rootfs"
        rootfs.mkdir()
        _run(
            [
                "tar",
                "-x",
                "-p",
                "--numeric-owner",
                "--xattrs",
                "-f",
                str(base),
                "-C",
                str(rootfs),
            ]
        )
        for stale in (rootfs / "etc" / "ssh").glob("ssh_host_*"):
            stale.unlink()
        sbin = rootfs / "usr" / "sbin"
        _install(sbin / "lab-init", self.guest_file("lab-init"), 0o755)
        for name in ("poweroff", "reboot", "halt"):
            _install(sbin / name, self.guest_file("poweroff"), 0o755)
        _install(
            rootfs / "etc" / "ssh" / "sshd_config",
            self.guest_file("sshd_config"),
            0o644,
        )
        _ssh_keygen(rootfs / "etc" / "ssh" / "ssh_host_ed25519_key", "root@" + recipe.HOSTNAME)
        ssh_dir = rootfs / "root" / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        _install(
            ssh_dir / "authorized_keys", (self.work / f"{KEY}.pub").read_bytes(), 0o600
        )
        _install(rootfs / "etc" / "hostname", f"{recipe.HOSTNAME}\n".encode(), 0o644)
        hosts = f"127.0.0.1\tlocalhost\n127.0.1.1\t{recipe.HOSTNAME}\n"
        _install(rootfs / "etc" / "hosts", hosts.encode(), 0o644)
        modules.copy_into(
            rootfs / "usr" / "lib" / "modules" / version,
            recipe.INITRAMFS_MODULES + recipe.BOOT_MODULES + recipe.ON_DEMAND_MODULES,
        )
        _run([tool("depmod"), "-b", str(rootfs), version])
        for junk in (
            "var/cache/apt",
            "var/lib/apt/lists",
            "var/cache/debconf",
            "var/log",
        ):
            for child in (rootfs / junk).glob("*"):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        return rootfs

    def _ext4(self, rootfs: Path) -> None:
        used = _tree_bytes(rootfs)
        size_mib = (used * 11 // 10) // (1 << 20) + recipe.ROOTFS_FREE_MIB
        image = self.work / ROOTFS
        # no journal: the root is only ever mounted read-only
        _run(
            [
                tool("mke2fs"),
                "-q",
                "-F",
                "-t",
                "ext4",
                "-O",
                "^has_journal",
                "-m",
                "0",
                "-L",
                "labroot",
                "-d",
                str(rootfs),
                str(image),
                f"{size_mib}M",
            ]
        )

    def _stamp(self, name: str, kernel_version: str) -> None:
        files = {}
        for small in SMALL_FILES:
            data = (self.work / small).read_bytes()
            files[small] = {"size": len(data), "sha256": _sha256(data)}
        rootfs = self.work / ROOTFS
        files[ROOTFS] = {
            "size": rootfs.stat().st_size,
            "sha256": _file_sha256(rootfs),
            "edges": _edge_digest(rootfs),
        }
        stamp = {
            "recipe_hash": name,
            "kernel_version": kernel_version,
            "cmdline": recipe.CMDLINE,
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files,
        }
        (self.work / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")


class _ModuleTree:
    """The kernel package's modules, indexed by name through its modules.dep."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.deps: dict[str, list[str]] = {}
        self.paths: dict[str, str] = {}
        for line in (directory / "modules.dep").read_text().splitlines():
            path, _, deps = line.partition(":")
            name = _module_name(path)
            self.paths[name] = path
            self.deps[name] = [_module_name(d) for d in deps.split()]

    def path(self, name: str) -> Path:
        if name not in self.paths:
            raise LabError(f"the guest kernel has no module {name} (recipe error)")
        return self.directory / self.paths[name]

    def closure(self, names: tuple[str, ...]) -> set[str]:
        wanted: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            if name not in wanted:
                self.path(name)
                wanted.add(name)
                todo.extend(self.deps[name])
        return wanted

    def check_load_order(self, order: tuple[str, ...]) -> None:
        """The recipe's explicit insmod order must load every dependency first."""
        for i, name in enumerate(order):
            missing = [d for d in self.deps.get(name, []) if d not in order[:i]]
            self.path(name)
            if missing:
                raise LabError(
                    f"recipe error: initramfs module {name} needs {missing} loaded before it"
                )

    def copy_into(self, target: Path, names: tuple[str, ...]) -> None:
        for name in sorted(self.closure(names)):
            dest = target / self.paths[name]
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.directory / self.paths[name], dest)
        for meta in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            shutil.copy2(self.directory / meta, target / meta)


def _module_name(path: str) -> str:
    return Path(path).name.removesuffix(".ko").replace("-", "_")


def _install(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            total += (
                os.lstat(os.path.join(dirpath, name)).st_blocks * 512 + 256
            )  # + inode
    return total


def host_mirrors(suite: str, apt: Path = Path("/etc/apt")) -> list[str]:
    """One-line apt sources for `suite` (and its -updates/-security) from the host's own config."""
    entries: list[tuple[str, str, str]] = []  # (options, uri, suite)
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for path in files:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if not words or words[0] != "deb":
                continue
            options = ""
            if words[1].startswith("["):
                end = next(i for i, w in enumerate(words) if w.endswith("]"))
                options = " ".join(words[1 : end + 1])
                words = [words[0], *words[end + 1 :]]
            entries.append((options, words[1], words[2]))
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for paragraph in path.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in paragraph.splitlines():
                if line.startswith("#") or ":" not in line or line[0].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if (
                "deb" not in fields.get("types", "").split()
                or fields.get("enabled", "yes") == "no"
            ):
                continue
            options = (
                f"[signed-by={fields['signed-by']}]" if "signed-by" in fields else ""
            )
            for uri in fields.get("uris", "").split():
                for s in fields.get("suites", "").split():
                    entries.append((options, uri, s))
    wanted = {suite, f"{suite}-updates", f"{suite}-security"}
    lines = [
        f"deb {o} {u} {s} main".replace("  ", " ") for o, u, s in entries if s in wanted
    ]
    if not any(f" {suite} main" in line for line in lines):
        raise LabError(
            f"no apt source for {suite} in /etc/apt/sources.list(.d): "
            "the image is built from the host's Debian mirror"
        )
    return list(dict.fromkeys(lines))


def _bzimage_payload(bzimage: bytes) -> bytes:
    """The uncompressed ELF vmlinux inside a bzImage (x86 boot protocol >= 2.08, xz payload)."""
    if bzimage[0x202:0x206] != b"HdrS":
        raise ValueError("not a bzImage")
    setup_sects = bzimage[0x1F1] or 4
    start = (setup_sects + 1) * 512
    offset = int.from_bytes(bzimage[0x248:0x24C], "little")
    length = int.from_bytes(bzimage[0x24C:0x250], "little")
    payload = bzimage[start + offset : start + offset + length]
    if not payload.startswith(b"\xfd7zXZ\x00"):
        raise ValueError("the kernel payload is not xz-compressed")
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if not elf.startswith(b"\x7fELF\x02"):
        raise ValueError("the kernel payload is not a 64-bit ELF")
    return elf


def _has_pvh_note(elf: bytes) -> bool:
    """True if the ELF carries XEN_ELFNOTE_PHYS32_ENTRY, which QEMU needs for PVH boot."""
    phoff = int.from_bytes(elf[32:40], "little")
    phentsize = int.from_bytes(elf[54:56], "little")
    phnum = int.from_bytes(elf[56:58], "little")
    pt_note, xen_elfnote_phys32_entry = 4, 18
    for i in range(phnum):
        ph = elf[phoff + i * phentsize : phoff + (i + 1) * phentsize]
        if int.from_bytes(ph[0:4], "little") != pt_note:
            continue
        pos = int.from_bytes(ph[8:16], "little")
        end = pos + int.from_bytes(ph[32:40], "little")
        while pos + 12 <= end:
            namesz, descsz, kind = (
                int.from_bytes(elf[pos + j : pos + j + 4], "little") for j in (0, 4, 8)
            )
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and kind == xen_elfnote_phys32_entry:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False
