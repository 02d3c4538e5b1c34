"""Fast tests of the image recipe, builder cache and host checks (no QEMU, no image build)."""

from __future__ import annotations

import argparse
import fcntl
import json
import lzma
import re
import shutil
import stat
import struct
import threading
import time
from pathlib import Path

import pytest

from images import builder, recipe
from images.cpio import CpioWriter
from lab import host
from lab.commands import doctor, image
from lab.errors import LabError


@pytest.fixture
def guest_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    copy = tmp_path / "guest"
    shutil.copytree(recipe.GUEST_DIR, copy)
    monkeypatch.setattr(recipe, "GUEST_DIR", copy)
    return copy


def test_recipe_hash_follows_guest_file_content(guest_copy: Path) -> None:
    before = recipe.recipe_hash()
    assert recipe.recipe_hash() == before
    init = guest_copy / "lab-init"
    init.write_text(init.read_text() + "\n# changed\n")
    assert recipe.recipe_hash() != before


def test_recipe_hash_follows_recipe_data_and_builder_format(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = recipe.recipe_hash()
    monkeypatch.setattr(recipe, "ROOTFS_PACKAGES", recipe.ROOTFS_PACKAGES + ("strace",))
    with_package = recipe.recipe_hash()
    monkeypatch.setattr(recipe, "BUILDER_FORMAT", recipe.BUILDER_FORMAT + 1)
    assert len({before, with_package, recipe.recipe_hash()}) == 3


def test_rootfs_base_hash_ignores_guest_files(guest_copy: Path) -> None:
    before = recipe.rootfs_base_hash()
    (guest_copy / "lab-init").write_text("#!/bin/sh\n")
    assert recipe.rootfs_base_hash() == before


def test_every_placeholder_in_guest_files_is_substituted() -> None:
    files = recipe.guest_files()
    rendered = {
        name: recipe.render(content).decode() for name, content in files.items()
    }
    for name, text in rendered.items():
        assert not re.search(r"@[A-Z_]+@", text), f"{name} keeps a placeholder"
    assert recipe.substitutions()["READY_MARKER"] in rendered["lab-init"]
    assert recipe.substitutions()["ROOT_SERIAL"] in rendered["initramfs-init"]


def _fake_image(directory: Path) -> None:
    """A complete image directory with a valid stamp, written the way the builder writes it."""
    directory.mkdir(parents=True)
    for name in builder.SMALL_FILES:
        (directory / name).write_bytes(name.encode() * 1000)
    (directory / builder.ROOTFS).write_bytes(
        bytes(range(256)) * 40000
    )  # 10 MiB: head, middle, tail
    work = builder._Build.__new__(builder._Build)
    work.work = directory
    work._stamp(recipe.recipe_hash(), "6.1.0-test-amd64")


def test_cached_image_loads(tmp_path: Path) -> None:
    _fake_image(tmp_path / "img")
    info = builder.load_image(tmp_path / "img")
    assert info.kernel == tmp_path / "img" / builder.KERNEL
    assert info.kernel_version == "6.1.0-test-amd64"
    assert info.recipe_hash == recipe.recipe_hash()
    assert set(info.to_json()) >= {
        "kernel",
        "initrd",
        "rootfs",
        "key",
        "cmdline",
        "recipe_hash",
    }


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / builder.KERNEL).write_bytes(b"x" * 5000),
        lambda d: (d / builder.INITRD).unlink(),
        lambda d: (d / builder.ROOTFS).open("r+b").truncate(1 << 20),
        lambda d: _overwrite(d / builder.ROOTFS, 4096, b"\xff" * 16),
        lambda d: _overwrite(
            d / builder.ROOTFS, (d / builder.ROOTFS).stat().st_size - 10, b"\0" * 10
        ),
        lambda d: (d / builder.STAMP).write_text("{not json"),
    ],
    ids=[
        "kernel",
        "initrd-missing",
        "rootfs-truncated",
        "rootfs-head",
        "rootfs-tail",
        "stamp",
    ],
)
def test_damaged_cached_image_is_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage
) -> None:
    monkeypatch.delenv("LAB_CACHE", raising=False)
    image = builder.image_dir(tmp_path)
    _fake_image(image)
    damage(image)
    with pytest.raises(LabError) as err:
        builder.ensure_image(cache_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert "lab image build --force" in message


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_second_process_waits_for_the_lock_then_uses_the_result(tmp_path: Path) -> None:
    """While another builder holds the lock, ensure_image waits, then takes its finished image."""
    (tmp_path / "images").mkdir()
    messages: list[str] = []
    result: list[object] = []
    with open(tmp_path / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiter = threading.Thread(
            target=lambda: result.append(
                builder.ensure_image(tmp_path, progress=messages.append)
            )
        )
        waiter.start()
        time.sleep(0.8)
        assert waiter.is_alive() and not result
        _fake_image(builder.image_dir(tmp_path))
        fcntl.flock(lock, fcntl.LOCK_UN)
        waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert result[0].rootfs == builder.image_dir(tmp_path) / builder.ROOTFS
    assert any("waiting" in m for m in messages)


def test_leftovers_of_interrupted_builds_are_removed(tmp_path: Path) -> None:
    stale_dir = tmp_path / "images" / ".tmp-abc-123"
    stale_tar = tmp_path / "rootfs-base" / ".tmp-def.tar"
    kept = tmp_path / "images" / "abc"
    for d in (stale_dir, kept, stale_tar.parent):
        d.mkdir(parents=True)
    (stale_dir / "vmlinux").write_bytes(b"partial")
    stale_tar.write_bytes(b"partial")
    builder._remove_leftovers(tmp_path)
    assert not stale_dir.exists() and not stale_tar.exists() and kept.is_dir()


def test_a_new_build_removes_superseded_ones(tmp_path: Path) -> None:
    current = builder.image_dir(tmp_path)
    base = tmp_path / "rootfs-base" / f"{recipe.rootfs_base_hash()}.tar"
    old_image = tmp_path / "images" / ("0" * 64)
    old_base = tmp_path / "rootfs-base" / ("1" * 64 + ".tar")
    for d in (current, old_image, base.parent):
        d.mkdir(parents=True)
    for f in (base, old_base, old_image / "rootfs.ext4"):
        f.write_bytes(b"x")
    messages: list[str] = []
    builder._remove_superseded(tmp_path, current, messages.append)
    assert current.is_dir() and base.is_file()
    assert not old_image.exists() and not old_base.exists()
    assert messages == [f"image: removed 2 superseded build(s) from {tmp_path}"]


def test_cache_root_honours_lab_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    assert builder.image_dir() == tmp_path / "images" / recipe.recipe_hash()
    monkeypatch.delenv("LAB_CACHE")
    assert builder.cache_root() == Path.home() / ".cache" / "qemu-lab"


def _elf(program_headers: list[tuple[int, bytes]]) -> bytes:
    """A minimal ELF64 whose program headers each point at their payload."""
    phoff, phentsize = 64, 56
    data_at = phoff + phentsize * len(program_headers)
    header = bytearray(64)
    header[0:5] = b"\x7fELF\x02"
    header[32:40] = phoff.to_bytes(8, "little")
    header[54:56] = phentsize.to_bytes(2, "little")
    header[56:58] = len(program_headers).to_bytes(2, "little")
    table, blob = b"", b""
    for kind, payload in program_headers:
        offset = data_at + len(blob)
        table += struct.pack(
            "<IIQQQQQQ", kind, 0, offset, 0, 0, len(payload), len(payload), 4
        )
        blob += payload
    return bytes(header) + table + blob


def _note(name: bytes, kind: int, desc: bytes) -> bytes:
    padded = name + b"\0" * (-len(name) % 4)
    return struct.pack("<III", len(name), len(desc), kind) + padded + desc


def test_pvh_note_is_recognised() -> None:
    gnu = _note(b"GNU\0", 3, b"\0" * 20)
    pvh = _note(b"Xen\0", 18, b"\0\0\0\x01")
    assert builder._has_pvh_note(_elf([(4, gnu + pvh)]))
    assert not builder._has_pvh_note(_elf([(4, gnu)]))
    assert not builder._has_pvh_note(_elf([(1, pvh)]))  # PT_LOAD, not a note


def test_vmlinux_comes_out_of_the_bzimage_payload() -> None:
    elf = _elf([(4, _note(b"Xen\0", 18, b"\0" * 4))])
    payload = (
        lzma.compress(elf, format=lzma.FORMAT_XZ) + b"\x12\x34\x56\x78"
    )  # size trailer
    setup_sects = 2
    bzimage = bytearray((setup_sects + 1) * 512)
    bzimage[0x1F1] = setup_sects
    bzimage[0x202:0x206] = b"HdrS"
    bzimage[0x248:0x24C] = (64).to_bytes(4, "little")
    bzimage[0x24C:0x250] = len(payload).to_bytes(4, "little")
    bzimage += b"\0" * 64 + payload
    assert builder._bzimage_payload(bytes(bzimage)) == elf
    with pytest.raises(ValueError):
        builder._bzimage_payload(bytes(bzimage).replace(b"HdrS", b"NoNo"))


def _read_cpio(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    entries, pos = {}, 0
    while True:
        assert data[pos : pos + 6] == b"070701" and pos % 4 == 0
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_end = pos + 110 + namesize
        name = data[pos + 110 : name_end - 1].decode()
        start = name_end + (-name_end % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[start : start + size], (fields[9], fields[10]))
        pos = start + size + (-(start + size) % 4)


def test_cpio_newc_round_trip() -> None:
    cpio = CpioWriter()
    cpio.directory("bin")
    cpio.file("bin/tool", b"abcde", 0o755)
    cpio.symlink("bin/sh", "tool")
    cpio.char_device("dev/console", 5, 1)
    entries = _read_cpio(cpio.finish())
    assert stat.S_ISDIR(entries["bin"][0])
    assert (
        entries["bin/tool"][1] == b"abcde"
        and stat.S_IMODE(entries["bin/tool"][0]) == 0o755
    )
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"tool"
    assert stat.S_ISCHR(entries["dev/console"][0]) and entries["dev/console"][2] == (
        5,
        1,
    )


def test_host_mirrors_come_from_the_hosts_apt_config(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# a comment\ndeb [arch=amd64] http://mirror.example/debian bookworm main contrib\n"
        "deb-src http://mirror.example/debian bookworm main\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\nSigned-By: /k.gpg\n\n"
        "Types: deb\nURIs: http://other.example/x\nSuites: nodistro\nComponents: main\n"
    )
    assert builder.host_mirrors("bookworm", tmp_path) == [
        "deb [arch=amd64] http://mirror.example/debian bookworm main",
        "deb [signed-by=/k.gpg] http://sec.example/debian-security bookworm-security main",
    ]
    with pytest.raises(LabError, match="no apt source for trixie"):
        builder.host_mirrors("trixie", tmp_path)


def _fake_binaries(
    directory: Path, skip: set[str], dynamic_busybox: bool = False
) -> None:
    directory.mkdir(exist_ok=True)
    for req in host.REQUIREMENTS:
        if req.binary in skip:
            continue
        path = directory / req.binary
        if req.static:
            interp = [(3, b"/lib64/ld-linux-x86-64.so.2\0")] if dynamic_busybox else []
            path.write_bytes(_elf([(1, b""), *interp]))
        else:
            path.write_text("#!/bin/sh\n")
        path.chmod(0o755)


def test_check_host_reports_missing_packages(tmp_path: Path) -> None:
    every = sorted({r.package for r in host.REQUIREMENTS})
    assert host.check_host(path=str(tmp_path / "nothing")) == every
    _fake_binaries(tmp_path / "bin", skip=set())
    assert host.check_host(path=str(tmp_path / "bin")) == []
    _fake_binaries(tmp_path / "some", skip={"qemu-img", "mke2fs"})
    assert host.check_host(path=str(tmp_path / "some")) == ["e2fsprogs", "qemu-utils"]
    _fake_binaries(tmp_path / "dyn", skip=set(), dynamic_busybox=True)
    assert host.check_host(path=str(tmp_path / "dyn")) == ["busybox-static"]


def test_doctor_is_silent_when_all_is_there_and_names_the_fix_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(host, "_SBIN_DIRS", ())
    _fake_binaries(tmp_path / "bin", skip=set())
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert doctor.run(argparse.Namespace(fix=False)) == 0
    assert capsys.readouterr() == ("", "")
    (tmp_path / "bin" / "fio").unlink()
    assert doctor.run(argparse.Namespace(fix=False)) == 1
    err = capsys.readouterr().err
    assert "fio" in err and "apt-get install -y --no-install-recommends fio" in err


def test_tool_names_the_package_when_a_binary_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(host, "_SBIN_DIRS", ())
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LabError, match="mmdebstrap is missing .*lab doctor --fix"):
        host.tool("mmdebstrap")


def test_stamp_records_what_it_verifies(tmp_path: Path) -> None:
    _fake_image(tmp_path / "img")
    stamp = json.loads((tmp_path / "img" / builder.STAMP).read_text())
    assert set(stamp["files"]) == {*builder.SMALL_FILES, builder.ROOTFS}
    assert stamp["cmdline"] == recipe.CMDLINE


def test_deep_verify_catches_damage_the_cheap_check_cannot_see(tmp_path: Path) -> None:
    _fake_image(tmp_path / "img")
    rootfs = tmp_path / "img" / builder.ROOTFS
    _overwrite(
        rootfs, rootfs.stat().st_size // 2, b"\xee" * 8
    )  # neither first nor last MiB
    builder.load_image(tmp_path / "img")
    with pytest.raises(LabError, match="rootfs.raw differs"):
        builder.load_image(tmp_path / "img", deep=True)


def test_image_info_without_a_built_image_says_how_to_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    with pytest.raises(LabError, match="run `lab image build`"):
        image.run_info(argparse.Namespace(verify=False))


def test_doctor_fix_without_root_prints_the_command_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(host, "_SBIN_DIRS", ())
    _fake_binaries(tmp_path / "bin", skip={"fio"})
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(doctor.os, "geteuid", lambda: 1000)
    assert doctor.run(argparse.Namespace(fix=True)) == 1
    assert "apt-get install -y --no-install-recommends fio" in capsys.readouterr().err


def test_installing_starts_no_service_and_keeps_a_hosts_own_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = tmp_path / "policy-rc.d"
    monkeypatch.setattr(host, "POLICY_RC_D", policy)
    seen: list[str] = []
    monkeypatch.setattr(host, "_apt", lambda packages: seen.append(policy.read_text()))
    host.install(["openssh-server"])
    assert "exit 101" in seen[0] and not policy.exists()  # denied while apt ran, gone after
    policy.write_text("#!/bin/sh\nexit 0\n")
    host.install(["openssh-server"])
    assert seen[1] == "#!/bin/sh\nexit 0\n" and policy.read_text() == seen[1]
