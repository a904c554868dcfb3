"""The shared_storage connector: KV blocks saved under a directory, found and loaded by any later
process with the same KV layout (vLLM's ExampleConnector, formerly SharedStorageConnector).

A request's new chunks are written as one segment file, ``<path>/<layout>/<first key>.kvseg``,
not one small file per block per layer (creating a file costs about 300 µs here, which makes
16 KiB-per-file storage 30x slower than one large write). A segment holds a run of consecutive
chunk keys of one prompt; a lookup walks the prompt's keys from segment to segment. Writes are
atomic: a temporary file, fsync, rename. Every segment carries what is needed to reject it: a magic
and version, the layout fingerprint, the byte count, a checksum of its header and a hash of every
page (xxh3-64: reordered or swapped words change it, unlike a sum), so a truncated, corrupt or
foreign file is never loaded as data: it is a miss or a failure, by ``kv_load_failure_policy``,
with a message naming the file. The header is parsed by a strict model, so a malformed one (with a
valid checksum) is such a failure too, never a crash. Only regular files are read (``O_NOFOLLOW``,
non-blocking open: a symlink or a FIFO at a segment's path is a failure, not a hang), the layout
folder must be a real folder (never a symlink: eviction would delete where it points), temporary
files of writers that died are removed at start, and the header cache is bounded.

The default folder is per user: ``$XDG_CACHE_HOME/kvconf/shared_storage`` (else
``~/.cache/kvconf/shared_storage``), created with mode 0700. Where others can write to the folder,
``hmac_key_file`` authenticates the segments: page hashes keyed by a secret and bound to their
chunk key, layer and row, so a forged, altered or rearranged segment is refused like a corrupt one.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import time
import uuid
import zlib
from collections import OrderedDict
from typing import Any, Literal, Optional

from pydantic import Field, ValidationError, field_validator

from kvconf.config.base import StrictModel
from kvconf.contract.api import KVConnectorRole
from kvconf.contract.capabilities import ChecksConfig
from kvconf.errors import Problem
from kvconf.units import PositiveByteSize, parse_bytes
from kvconf_connectors.p2p.auth import read_secret, secret_file_problems
from kvconf_connectors.tier import Chunk, TierConnector, TierMetadata, TierOp

MAGIC = b"KVCSEG01"
_PREFIX = struct.Struct("<8sII")  # magic, header length, header crc32
SUFFIX = ".kvseg"


class SharedStorageExtra(StrictModel):
    """Settings of the shared_storage connector."""

    shared_storage_path: str = "~/.cache/kvconf/shared_storage"
    """Directory the blocks are saved under (vLLM's key); created if missing, mode 0700. The shipped
    option uses ``$XDG_CACHE_HOME/kvconf/shared_storage`` (else ``~/.cache/...``): per user, not a
    world-writable folder. A leading ``~`` is the user's home."""
    capacity: PositiveByteSize | None = None
    """Most bytes kept under the directory for this layout; the oldest files go first. Unset: no limit."""
    hmac_key_file: Optional[str] = Field(None, min_length=1, max_length=4096)
    """File holding a secret (16 to 4096 characters, mode 0600) that authenticates the segments: each
    page's hash becomes a keyed BLAKE2b of the page, its chunk's key, its layer and its row, so
    nobody without the secret can write a segment this connector will load, nor move pages or keys
    between segments. Where others can write to the folder. Unset: xxh3-64 hashes (corruption only).
    Loads then hash at about 0.65 GB/s instead of 9."""

    @field_validator("shared_storage_path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("shared_storage_path cannot be empty")
        return v


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


def page_sums(rows: Any, mac: Optional[bytes] = None, labels: Optional[list[bytes]] = None) -> list[int]:
    """One hash per page (row): xxh3-64, which reordered or swapped words change (a sum of words
    would not), at memory speed (about 9 GB/s here; crc32 runs at 2.4 GB/s, blake2b at 0.65).
    With a ``mac`` key: BLAKE2b-64 keyed by it, over each row's label (where it belongs) and bytes."""
    data = memoryview(rows.contiguous().numpy()).cast("B")
    page = rows.shape[1]
    if mac is not None:
        assert labels is not None and len(labels) == rows.shape[0]
        out = []
        for i in range(rows.shape[0]):
            h = hashlib.blake2b(labels[i], key=mac, digest_size=8)
            h.update(data[i * page:(i + 1) * page])
            out.append(int.from_bytes(h.digest(), "little"))
        return out
    import xxhash

    return [xxhash.xxh3_64_intdigest(data[i * page:(i + 1) * page]) for i in range(rows.shape[0])]


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


class SharedStorageConnector(TierConnector, ChecksConfig):
    """Disk tier: a request's new blocks in one segment file, atomically written, checked on load."""

    extra_config = SharedStorageExtra
    vllm_name = "ExampleConnector"
    vllm_extra_keys = {"shared_storage_path": "shared_storage_path"}
    baseline = "file_io"

    def __init__(self, config, role, kv_cache_config) -> None:
        super().__init__(config, role, kv_cache_config)
        self.layers = [(n, g.kv_cache_spec.page_size_bytes) for g in kv_cache_config.kv_cache_groups
                       for n in g.layer_names]
        self.layout = hashlib.sha256(json.dumps([self.layers, self.chunk_blocks]).encode()).hexdigest()[:16]
        self.root = os.path.expanduser(self.extra.shared_storage_path)
        self.dir = os.path.join(self.root, self.layout)
        self.capacity = parse_bytes(self.extra.capacity) if self.extra.capacity is not None else None
        self._headers: OrderedDict[str, tuple[tuple[int, int], dict[str, Any]]] = OrderedDict()
        self._mac = (read_secret("connector.extra.hmac_key_file", self.extra.hmac_key_file)
                     if self.extra.hmac_key_file else None)
        self._hash = "xxh3-64" if self._mac is None else "blake2b-64-keyed"
        if role is KVConnectorRole.WORKER:
            self._remove_orphans()
        self._staging: dict[str, dict[str, Any]] = {}
        self._arena: Any = None  # reused save buffer: fresh memory would fault in at a quarter of the speed
        self._read_buf: Any = None

    @classmethod
    def config_problems(cls, connector: dict[str, Any], kv_cache_config: Any = None) -> list[Problem]:
        """A ``hmac_key_file`` that is missing, readable by others or too short: exit 2 at check time."""
        file = (connector.get("extra") or {}).get("hmac_key_file")
        return secret_file_problems("connector.extra.hmac_key_file", file) if file else []

    def path_of(self, key: bytes) -> str:
        return os.path.join(self.dir, key.hex() + SUFFIX)

    # ---- the folder ----------------------------------------------------------------------------
    def _check_dir(self, create: bool) -> None:
        """The layout folder must be a real folder of ours: never a symlink (eviction would delete
        where it points); created (and the root, mode 0700) when ``create``."""
        if create:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            try:
                os.mkdir(self.dir, 0o700)
            except FileExistsError:
                pass
        try:
            st = os.lstat(self.dir)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise BadSegment(f"{self.dir}: the layout folder is a symbolic link or not a folder: refused "
                             "(remove it; kvconf creates it)")

    def _remove_orphans(self) -> None:
        """Temporary files of writers on this host that died before their rename."""
        try:
            self._check_dir(create=False)
            entries = list(os.scandir(self.dir))
        except (OSError, BadSegment):
            return
        host = os.uname().nodename
        for e in entries:
            parts = e.name.split(".")  # .HOST.PID.UUID.tmp
            if len(parts) != 5 or parts[0] or parts[4] != "tmp" or parts[1] != host or not parts[2].isdigit():
                continue
            try:
                os.kill(int(parts[2]), 0)
                continue  # its writer is alive
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            try:
                os.unlink(e.path)
            except OSError:
                pass

    # ---- reading segments ----------------------------------------------------------------------
    def read_header(self, path: str, fd: Optional[int] = None) -> dict[str, Any]:
        """The segment's header, checked; :class:`BadSegment` naming the file and the reason."""
        own = fd is None
        fd = open_regular(path) if fd is None else fd
        try:
            return self._header(path, fd)
        finally:
            if own:
                os.close(fd)

    def _header(self, path: str, fd: int) -> dict[str, Any]:
        st = os.fstat(fd)
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._headers.get(path)
        if cached and cached[0] == stamp:
            self._headers.move_to_end(path)
            return cached[1]
        head = os.pread(fd, _PREFIX.size, 0)
        if len(head) < _PREFIX.size:
            raise BadSegment(f"{path}: truncated: {len(head)} B, shorter than its {_PREFIX.size} B prefix")
        magic, hlen, hcrc = _PREFIX.unpack(head)
        if magic != MAGIC:
            raise BadSegment(f"{path}: not a kvconf segment (magic {magic!r}, expected {MAGIC!r})")
        if hlen > min(st.st_size, 64 << 20):
            raise BadSegment(f"{path}: a header of {hlen} B cannot be right (the file is {st.st_size} B)")
        raw = os.pread(fd, hlen, _PREFIX.size)
        if len(raw) < hlen:
            raise BadSegment(f"{path}: truncated inside its header ({len(raw)} of {hlen} B)")
        if zlib.crc32(raw) != hcrc:
            raise BadSegment(f"{path}: header checksum mismatch (the file is corrupt)")
        try:
            header = SegmentHeader.model_validate_json(raw).model_dump()
        except (ValidationError, ValueError, RecursionError) as exc:
            first = exc.errors()[0] if isinstance(exc, ValidationError) else None
            why = (f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}" if first else type(exc).__name__)
            raise BadSegment(f"{path}: a malformed header ({why})") from None
        if header["hash"] != self._hash:
            raise BadSegment(f"{path}: its pages carry {header['hash']} hashes; this connector "
                             + ("authenticates segments (hmac_key_file): an unauthenticated segment is not read"
                                if self._mac else "has no hmac_key_file to check their keyed hashes with"))
        if header["version"] != VERSION:
            raise BadSegment(f"{path}: written by an older kvconf (segment version {header['version']}, page sums "
                             "instead of hashes): not read; it is replaced when the blocks are saved again")
        if len(header["sums"]) != len(self.layers) or any(len(s) != len(header["keys"]) * header["chunk_blocks"]
                                                          for s in header["sums"]):
            raise BadSegment(f"{path}: a malformed header (its page hashes do not match its keys and layers)")
        if header.get("layout") != self.layout:
            raise BadSegment(f"{path}: written for another KV layout ({header.get('layout')}; this cache is "
                             f"{self.layout}: layers, page sizes or chunk size differ)")
        expected = _PREFIX.size + hlen + header["data_bytes"]
        if st.st_size != expected:
            raise BadSegment(f"{path}: truncated or padded: {st.st_size} B on disk, {expected} B expected")
        header["_data_offset"] = _PREFIX.size + hlen
        self._headers[path] = (stamp, header)
        while len(self._headers) > HEADER_CACHE:
            self._headers.popitem(last=False)
        return header

    def _walk(self, keys: list[bytes]) -> list[tuple[str, int]]:
        """(segment, index in it) of the leading keys the directory holds. A segment that exists but
        does not pass its checks still claims its first key, so that the load reports it by policy."""
        found: list[tuple[str, int]] = []
        while len(found) < len(keys):
            path = self.path_of(keys[len(found)])
            if not os.path.lexists(path):
                break
            try:
                header = self.read_header(path)
            except (BadSegment, ValueError, KeyError, OSError):
                found.append((path, 0))
                break
            have = header["keys"]
            m = 0
            while m < len(have) and len(found) + m < len(keys) and have[m] == keys[len(found) + m].hex():
                m += 1
            if m == 0:
                found.append((path, 0))
                break
            found.extend((path, i) for i in range(m))
        return found

    def _present(self, keys: list[bytes]) -> int:
        return len(self._walk(keys))

    def _places(self, keys: list[bytes]) -> list[Any]:
        return self._walk(keys)

    def _load_chunks(self, op: TierOp) -> dict[int, str]:
        """Reads each segment's needed rows per layer, checks them, scatters them into the cache."""

        errors: dict[int, str] = {}
        by_file: dict[str, list[tuple[int, Chunk]]] = {}
        for c in op.chunks:
            path, idx = c.place
            by_file.setdefault(path, []).append((idx, c))
        k = self.chunk_blocks
        for path, items in by_file.items():
            fd = -1
            try:
                self._check_dir(create=False)
                fd = open_regular(path)
                header = self.read_header(path, fd)
                n_keys = len(header["keys"])
                lo, hi = min(i for i, _ in items), max(i for i, _ in items) + 1
                offset = header["_data_offset"]
                for li, (name, page) in enumerate(self.layers):
                    rows = self._read_rows((hi - lo) * k, page)
                    got = os.preadv(fd, [memoryview(rows.numpy()).cast("B")], offset + lo * k * page)
                    if got != rows.numel():
                        raise BadSegment(f"{path}: truncated: short read in layer {name}")
                    labels = row_labels(header["keys"], name, k, lo * k, (hi - lo) * k) if self._mac else None
                    if page_sums(rows, self._mac, labels) != header["sums"][li][lo * k:hi * k]:
                        raise BadSegment(f"{path}: checksum mismatch in layer {name} (the file is corrupt"
                                         + (", or not written with this hmac_key_file)" if self._mac else ")"))
                    view = self._views[name]
                    for idx, c in items:
                        for j, b in enumerate(self.ids_of(c, name)):
                            view[b].copy_(rows[(idx - lo) * k + j])
                    offset += n_keys * k * page
            except (BadSegment, OSError, ValueError, KeyError, TypeError, IndexError) as exc:
                reason = str(exc) if isinstance(exc, BadSegment) else f"{path}: {type(exc).__name__}: {exc}"
                for _, c in items:
                    for b in {b for ids in c.block_ids for b in ids}:
                        errors[b] = reason
            finally:
                if fd >= 0:
                    os.close(fd)
        return errors

    # ---- writing segments ----------------------------------------------------------------------
    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TierMetadata)
        if not meta.staged:  # the step's first layer: lay out every save op's staging
            meta.staged = True
            self._stage(meta.saves)
        super().save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs)

    def _stage(self, ops: list[TierOp]) -> None:
        """Staging rows for each op and layer, carved out of one reused buffer."""
        import torch

        total = sum(len(op.chunks) * self.chunk_blocks * page for op in ops for _, page in self.layers)
        if self._arena is None or self._arena.numel() < total:
            self._arena = torch.zeros(total, dtype=torch.uint8)
        at = 0
        for op in ops:
            n = len(op.chunks) * self.chunk_blocks
            self._staging[op.request_id] = {}
            for name, page in self.layers:
                self._staging[op.request_id][name] = self._arena[at:at + n * page].view(n, page)
                at += n * page

    def _read_rows(self, rows: int, page: int) -> Any:
        import torch

        if self._read_buf is None or self._read_buf.numel() < rows * page:
            self._read_buf = torch.zeros(rows * page, dtype=torch.uint8)
        return self._read_buf[:rows * page].view(rows, page)

    def _save_layer(self, op: TierOp, layer: str) -> None:
        import torch

        ids = torch.tensor([b for c in op.chunks for b in self.ids_of(c, layer)])
        torch.index_select(self._views[layer], 0, ids, out=self._staging[op.request_id][layer])

    def _finish_save(self, op: TierOp) -> None:
        staging = self._staging.pop(op.request_id)
        keys = [c.key.hex() for c in op.chunks]
        k = self.chunk_blocks
        header = {
            "version": VERSION, "layout": self.layout, "layers": self.layers, "chunk_blocks": self.chunk_blocks,
            "keys": keys, "hash": self._hash,
            "sums": [page_sums(staging[name], self._mac,
                               row_labels(keys, name, k, 0, len(keys) * k) if self._mac else None)
                     for name, _ in self.layers],
            "data_bytes": sum(t.numel() for t in staging.values()),
            "written_by": f"{os.uname().nodename}:{os.getpid()}", "time": time.time(),
        }
        raw = json.dumps(header).encode()
        path = self.path_of(op.chunks[0].key)
        try:
            self._check_dir(create=True)
            tmp = os.path.join(self.dir, f".{os.uname().nodename}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except BadSegment as exc:
            raise OSError(str(exc)) from None
        except OSError as exc:
            raise OSError(f"cannot write under {self.dir}: {exc.strerror or exc}") from None
        try:
            bufs: list[bytes | memoryview] = [_PREFIX.pack(MAGIC, len(raw), zlib.crc32(raw)), raw,
                    *(memoryview(staging[name].numpy()).cast("B") for name, _ in self.layers)]
            total = sum(len(b) for b in bufs)
            written = os.writev(fd, bufs)
            while written < total:  # a short write: finish it
                flat = b"".join(bytes(b) for b in bufs)
                written += os.write(fd, flat[written:])
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            os.unlink(tmp)
            raise OSError(f"writing {path} failed: {exc.strerror or exc}") from None
        os.close(fd)
        os.replace(tmp, path)  # atomic: a reader sees the whole segment or none
        if self.capacity is not None:
            self._evict()

    def _evict(self) -> None:
        """Removes the oldest segments until the directory is within ``capacity``."""
        assert self.capacity is not None
        self._check_dir(create=False)  # never a symlinked folder: its files are not ours to delete
        files = []
        with os.scandir(self.dir) as it:
            for e in it:
                if e.name.endswith(SUFFIX) and e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    files.append((st.st_mtime_ns, st.st_size, e.path))
        used = sum(f[1] for f in files)
        for _, size, path in sorted(files):
            if used <= self.capacity:
                break
            try:
                os.unlink(path)
                used -= size
            except FileNotFoundError:
                pass

    def baseline_dir(self) -> str:
        return self.dir

    def shutdown(self) -> None:
        super().shutdown()
        self._staging = {}
        self._headers = OrderedDict()
        self._arena = self._read_buf = None
