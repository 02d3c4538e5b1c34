"""Verifiable I/O: every block carries a stamp saying which block, write generation and run it is.

Stamp at the start of each block (little-endian), the rest of the block a pattern derived from it:
    0  magic  b"LABSTAMP"       24  seed        u64
    8  lba    u64 (block index)  32  block_size  u32
    16 generation u64            36  crc32 of the whole block with this field zeroed
A verifier can then tell a block that is missing (zero), stale (older generation), misplaced
(another lba's stamp), torn/corrupt (bad checksum) or foreign (no stamp) - on a device buffer,
in a guest, or in the host's raw image file (verify_image).
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from typing import Callable, Mapping, Union

MAGIC = b"LABSTAMP"
STAMP = struct.Struct("<8sQQQI")
CRC = struct.Struct("<I")
CRC_OFF = STAMP.size  # 36
HEADER = CRC_OFF + CRC.size  # 40
MIN_BLOCK = 64
_ZERO_CRC = bytes(CRC.size)

# An expected generation for every lba: one int for all, a mapping, or a function.
# None means "never written (or discarded): must read as zeros".
Expected = Union[int, None, Mapping[int, Union[int, None]], Callable[[int], Union[int, None]]]


@dataclass(frozen=True)
class Mismatch:
    lba: int
    kind: str  # zero, foreign, corrupt, misplaced, stale, newer, wrong-seed, wrong-size, unexpected-data
    expected: str
    found: str

    def __str__(self) -> str:
        return f"block {self.lba}: {self.kind} (expected {self.expected}, found {self.found})"


def _pattern(lba: int, generation: int, seed: int) -> bytes:
    word = (lba * 0x9E3779B97F4A7C15 ^ generation * 0xC2B2AE3D27D4EB4F ^ seed * 0x165667B19E3779F9) & (2**64 - 1)
    return word.to_bytes(8, "little")


def _check_block_size(block_size: int) -> None:
    if block_size < MIN_BLOCK or block_size % 8:
        raise ValueError(f"block size {block_size} must be a multiple of 8 and at least {MIN_BLOCK}")


def stamp_block(buf: memoryview, lba: int, generation: int, seed: int) -> None:
    """Fill `buf` (exactly one block) with the stamp of (lba, generation, seed)."""
    size = len(buf)
    STAMP.pack_into(buf, 0, MAGIC, lba, generation, seed, size)
    buf[HEADER:] = _pattern(lba, generation, seed) * ((size - HEADER) // 8)
    CRC.pack_into(buf, CRC_OFF, 0)
    CRC.pack_into(buf, CRC_OFF, zlib.crc32(buf))


def fill(buf: memoryview | bytearray, first_lba: int, generation: int, seed: int, block_size: int = 4096) -> None:
    """Stamp every block of `buf` (its length a multiple of block_size) starting at `first_lba`."""
    _check_block_size(block_size)
    view = memoryview(buf).cast("B")
    if len(view) % block_size:
        raise ValueError(f"buffer of {len(view)} B is not a whole number of {block_size} B blocks")
    for i in range(len(view) // block_size):
        stamp_block(view[i * block_size : (i + 1) * block_size], first_lba + i, generation, seed)


def stamped(first_lba: int, count: int, generation: int, seed: int, block_size: int = 4096) -> bytes:
    buf = bytearray(count * block_size)
    fill(buf, first_lba, generation, seed, block_size)
    return bytes(buf)


def expected_generation(expected: Expected, lba: int) -> int | None:
    if expected is None or isinstance(expected, int):
        return expected
    if callable(expected):
        return expected(lba)
    return expected.get(lba)


def check_block(block: bytes | memoryview, lba: int, generation: int | None, seed: int) -> Mismatch | None:
    """None when the block is what (lba, generation, seed) says it must be."""
    block = bytes(block)
    size = len(block)
    if generation is None:
        if block.count(0) == size:
            return None
        return Mismatch(lba, "unexpected-data", "zeros", _describe(block))
    want = f"lba {lba} gen {generation} seed {seed}"
    magic, f_lba, f_gen, f_seed, f_size = STAMP.unpack_from(block)
    if magic != MAGIC:
        if block.count(0) == size:
            return Mismatch(lba, "zero", want, "all zeros")
        return Mismatch(lba, "foreign", want, _describe(block))
    crc = zlib.crc32(block[HEADER:], zlib.crc32(_ZERO_CRC, zlib.crc32(block[:CRC_OFF])))
    if crc != CRC.unpack_from(block, CRC_OFF)[0] or f_size != size:
        return Mismatch(lba, "corrupt" if f_size == size else "wrong-size", want, _describe(block))
    if f_seed != seed:
        return Mismatch(lba, "wrong-seed", want, f"seed {f_seed}")
    if f_lba != lba:
        return Mismatch(lba, "misplaced", want, f"lba {f_lba} gen {f_gen}")
    if f_gen < generation:
        return Mismatch(lba, "stale", want, f"gen {f_gen}")
    if f_gen > generation:
        return Mismatch(lba, "newer", want, f"gen {f_gen}")
    return None


def verify(
    buf: bytes | memoryview, first_lba: int, expected: Expected, seed: int, block_size: int = 4096
) -> list[Mismatch]:
    """Every mismatching block of `buf`, which holds blocks first_lba, first_lba+1, ..."""
    _check_block_size(block_size)
    view = memoryview(buf).cast("B")
    out = []
    for i in range(len(view) // block_size):
        lba = first_lba + i
        bad = check_block(view[i * block_size : (i + 1) * block_size], lba, expected_generation(expected, lba), seed)
        if bad is not None:
            out.append(bad)
    return out


def verify_image(
    path: str | os.PathLike,
    expected: Expected,
    seed: int,
    *,
    block_size: int = 4096,
    first_lba: int = 0,
    count: int | None = None,
    offset: int = 0,
    chunk_blocks: int = 256,
) -> list[Mismatch]:
    """Verify blocks of a raw image (block `lba` at byte offset + lba*block_size)."""
    _check_block_size(block_size)
    out: list[Mismatch] = []
    with open(path, "rb") as image:
        total = (os.fstat(image.fileno()).st_size - offset) // block_size
        last = total if count is None else first_lba + count
        if last > total:
            raise ValueError(f"{path}: blocks up to {last} requested, image holds {total}")
        lba = first_lba
        while lba < last:
            n = min(chunk_blocks, last - lba)
            data = os.pread(image.fileno(), n * block_size, offset + lba * block_size)
            out.extend(verify(data, lba, expected, seed, block_size))
            lba += n
    return out


def _describe(block: bytes) -> str:
    return f"bytes {block[:16].hex()}..."
