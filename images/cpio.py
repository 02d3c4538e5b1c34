"""A writer for the cpio "newc" format the kernel unpacks as its initramfs.

Written in Python rather than with cpio(1) so that entries need no files on disk: device nodes
and root ownership without root, and byte-identical output for identical input (mtime 0).
"""

from __future__ import annotations

import stat


class CpioWriter:
    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._ino = 0

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, b"")

    def file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"", ino=0)
        return b"".join(self._chunks)

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes,
        rdev: tuple[int, int] = (0, 0),
        ino: int | None = None,
    ) -> None:
        if ino is None:
            self._ino += 1
            ino = self._ino
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        )
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._chunks += [
            header,
            encoded,
            _pad(len(header) + len(encoded)),
            data,
            _pad(len(data)),
        ]


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)
