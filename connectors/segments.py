"""The segment file format of the shared_storage connector: what a segment holds, how its pages
are hashed, and how one is opened for reading without following links or blocking.

A segment is ``PREFIX`` (magic, header length, header crc32), a JSON header
(:class:`SegmentHeader`), then each layer's pages in turn: for every layer, the pages of every
chunk key, ``chunk_blocks`` rows a key. A page's hash is xxh3-64, or a keyed BLAKE2b-64 bound to
its chunk key, layer and row (``hmac_key_file``).
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from typing import Any, Literal, Optional

from pydantic import Field

from kvconf.config.base import StrictModel

__all__ = ["DIRECT_ALIGN", "HEADER_CACHE", "IOV_MAX", "MAGIC", "PREFIX", "SUFFIX", "VERSION", "BadSegment",
           "SegmentHeader", "open_regular", "page_hash", "pwrite_all", "row_labels"]

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
"""Most buffers one ``preadv``/``pwritev`` takes."""

DIRECT_ALIGN = 4096
"""What ``O_DIRECT`` asks of every buffer's address and length and of every file offset (a
device's logical block is 512 or 4096 bytes)."""

MAGIC = b"KVCSEG01"
PREFIX = struct.Struct("<8sII")  # magic, header length, header crc32
SUFFIX = ".kvseg"


class BadSegment(Exception):
    """A segment file that must not be loaded; the message names the file and the reason."""


VERSION = 2
"""Segments of version 1 carried sums of words as page checksums; they are not read."""

HEADER_CACHE = 4096
"""Most segment headers a connector keeps parsed."""


class SegmentHeader(StrictModel):
    """A segment's header, as written; any other content is a corrupt segment."""

    version: int = Field(ge=1, le=2)
    layout: str = Field(max_length=64)
    layers: list[tuple[str, int]]
    chunk_blocks: int = Field(ge=1)
    keys: list[str] = Field(min_length=1)
    sums: list[list[int]]
    hash: Literal["xxh3-64", "blake2b-64-keyed"] = "xxh3-64"
    """What ``sums`` are: plain page hashes, or keyed ones (``hmac_key_file``)."""
    data_bytes: int = Field(ge=0)
    written_by: str = ""
    time: float = 0.0


def page_hash(page: Any, mac: Optional[bytes] = None, label: bytes = b"") -> int:
    """A page's hash: xxh3-64, which reordered or swapped words change (a sum of words would
    not), at memory speed (about 9 GB/s here; crc32 runs at 2.4 GB/s, blake2b at 0.65). With a
    ``mac`` key: BLAKE2b-64 keyed by it, over the page's ``label`` (where it belongs) and bytes."""
    if mac is not None:
        h = hashlib.blake2b(label, key=mac, digest_size=8)
        h.update(page)
        return int.from_bytes(h.digest(), "little")
    import xxhash

    return xxhash.xxh3_64_intdigest(page)


def row_labels(keys: list[str], layer: str, k: int, first: int, n: int) -> list[bytes]:
    """Where rows ``first .. first + n`` of a layer's data belong: their chunk's key, the layer and
    the row within the chunk (``k`` rows a chunk)."""
    return [f"{keys[(first + r) // k]}/{layer}/{(first + r) % k}".encode() for r in range(n)]


def open_regular(path: str) -> int:
    """A descriptor of ``path`` for reading, only if it is a regular file: a symlink (``O_NOFOLLOW``)
    or a FIFO, device or folder is a :class:`BadSegment`, and opening never blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise BadSegment(f"{path}: the file is missing (removed or evicted)") from None
    except OSError as exc:
        if os.path.islink(path):
            raise BadSegment(f"{path}: a symbolic link, not a segment file (not followed)") from None
        raise BadSegment(f"{path}: cannot be opened: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BadSegment(f"{path}: not a regular file (a FIFO, device or folder): not read")
    return fd


def pwrite_all(fd: int, bufs: list[Any], offset: int) -> None:
    """``pwritev`` of every buffer from ``offset`` on, at most ``IOV_MAX`` a call, finishing short writes."""
    views = [memoryview(b).cast("B") for b in bufs]
    while views:
        batch = views[:IOV_MAX]
        n = os.pwritev(fd, batch, offset)
        offset += n
        while batch and n >= len(batch[0]):
            n -= len(batch[0])
            batch.pop(0)
            views.pop(0)
        if n:
            views[0] = views[0][n:]
