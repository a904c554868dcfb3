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

Loads and saves overlap the forward pass, layer by layer, on the connector's I/O thread
(:class:`~kvconf_connectors.tier.TierConnector`): a step's segments are opened and their headers
checked, then each layer's pages are read, checked and released to the engine
(``wait_for_layer_load``) while the engine computes the layers before; a layer the engine has just
written is written to each request's temporary segment file at its place while the engine
computes the next, and ``wait_for_save`` writes the headers (the page hashes; room for them is
set aside when the file is opened), syncs and renames.

No staging buffer sits between the file and the KV cache: a save writes the blocks' pages straight
from the cache (``pwritev`` of one buffer per page; with ``O_DIRECT`` where the file system takes
it and the pages are 4 KiB aligned, past the page cache too: the header is then padded with spaces
to a 4 KiB boundary, which JSON allows, so the format is the same), and a load reads them straight
into the destination blocks (``preadv``), then hashes every page where it landed. A page that fails its
check fails its whole segment's blocks in the request (the engine recomputes them, or the request
fails, by policy), and those blocks are zeroed: nothing is left half loaded.

The default folder is per user: ``$XDG_CACHE_HOME/kvconf/shared_storage`` (else
``~/.cache/kvconf/shared_storage``), created with mode 0700. Where others can write to the folder,
``hmac_key_file`` authenticates the segments: page hashes keyed by a secret and bound to their
chunk key, layer and row, so a forged, altered or rearranged segment is refused like a corrupt one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from pydantic import Field, ValidationError, field_validator

from kvconf.config.base import StrictModel
from kvconf.contract.api import KVConnectorRole
from kvconf.contract.capabilities import ChecksConfig, ColdLoads, KeepsStore
from kvconf.errors import Problem
from kvconf.units import DiskBytes, parse_bytes
from kvconf_connectors.p2p.auth import read_secret, secret_file_problems
from kvconf_connectors.segment_writer import SegmentWriter
from kvconf_connectors.segments import (
    DIRECT_ALIGN,
    HEADER_CACHE,
    IOV_MAX,
    MAGIC,
    PREFIX,
    SUFFIX,
    VERSION,
    BadSegment,
    SegmentHeader,
    open_regular,
    page_hash,
    row_labels,
)
from kvconf_connectors.tier import Chunk, TierConnector, TierOp


class SharedStorageExtra(StrictModel):
    """Settings of the shared_storage connector."""

    shared_storage_path: str = "~/.cache/kvconf/shared_storage"
    """Directory the blocks are saved under (vLLM's key); created if missing, mode 0700. The shipped
    option uses ``$XDG_CACHE_HOME/kvconf/shared_storage`` (else ``~/.cache/...``): per user, not a
    world-writable folder. A leading ``~`` is the user's home."""
    capacity: DiskBytes | None = None
    """Most bytes kept under the directory for this layout; the oldest files go first. Unset: no limit."""
    hmac_key_file: Optional[str] = Field(None, min_length=1, max_length=4096)
    """File holding a secret (16 to 4096 characters, mode 0600) that authenticates the segments: each
    page's hash becomes a keyed BLAKE2b of the page, its chunk's key, its layer and its row, so
    nobody without the secret can write a segment this connector will load, nor move pages or keys
    between segments. Where others can write to the folder. Unset: xxh3-64 hashes (corruption only).
    Loads then hash at about 0.65 GB/s instead of 9."""
    direct_io: bool = True
    """Write segments with ``O_DIRECT``: from the KV cache's pages straight to the device, past the
    page cache (measured here at llama3_8b: 2.5-3 GB/s instead of 0.7-1.5 through the cache, which
    must first find memory for every page). Used where the file system takes it (not tmpfs) and
    every page is 4 KiB aligned (a CPU KV cache); the page cache otherwise. False: through the page
    cache, so that a load soon after reads memory rather than the device."""

    @field_validator("shared_storage_path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("shared_storage_path cannot be empty")
        return v


class SharedStorageConnector(SegmentWriter, TierConnector, ChecksConfig, KeepsStore, ColdLoads):
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
        self._point_at(self.extra.shared_storage_path)
        self.capacity = parse_bytes(self.extra.capacity) if self.extra.capacity is not None else None
        self._headers: OrderedDict[str, tuple[tuple[int, int], dict[str, Any]]] = OrderedDict()
        self._mac = (read_secret("connector.extra.hmac_key_file", self.extra.hmac_key_file)
                     if self.extra.hmac_key_file else None)
        self._hash = "xxh3-64" if self._mac is None else "blake2b-64-keyed"
        if role is KVConnectorRole.WORKER:
            self._remove_orphans()
        self._pages: dict[str, Any] = {}
        """``layer -> numpy (num_blocks, page)`` over the KV cache: a block's page as a buffer."""
        self._writers: Optional[ThreadPoolExecutor] = None
        self._reads: Optional[tuple[list[TierOp], dict[str, dict[str, Any]]]] = None
        """The step's segments being read (its load ops, ``path -> fd, header, chunks, failure``)."""
        self._writing: dict[str, dict[str, Any]] = {}
        """The step's segments being written, by request."""
        self._direct = False
        """Segments are written with ``O_DIRECT`` (see :attr:`SharedStorageExtra.direct_io`)."""

    @classmethod
    def config_problems(cls, connector: dict[str, Any], kv_cache_config: Any = None) -> list[Problem]:
        """A ``hmac_key_file`` that is missing, readable by others or too short: exit 2 at check time."""
        file = (connector.get("extra") or {}).get("hmac_key_file")
        return secret_file_problems("connector.extra.hmac_key_file", file) if file else []

    def _point_at(self, path: str) -> None:
        self.root = os.path.expanduser(path)
        self.dir = os.path.join(self.root, self.layout)

    @contextlib.contextmanager
    def private_store(self) -> Iterator[str]:
        """A fresh folder beside the configured one (the same device), used and then removed."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        where = tempfile.mkdtemp(prefix=".kvconf-bench-", dir=self.root)
        config, extra, root = self._config, self._extra, self.root
        self._extra = extra.model_copy(update={"shared_storage_path": where})
        self._config = config.model_copy(update={"extra": {**config.extra, "shared_storage_path": where}})
        self._point_at(where)
        try:
            yield where
        finally:
            self._config, self._extra = config, extra
            self._point_at(root)
            self._headers.clear()
            shutil.rmtree(where, ignore_errors=True)

    def drop_cached(self) -> None:
        """Drops the page cache of every segment in the layout folder (they are synced: clean)."""
        try:
            entries = [e.path for e in os.scandir(self.dir) if e.name.endswith(SUFFIX)]
        except OSError:
            return
        for path in entries:
            try:
                fd = open_regular(path)
            except BadSegment:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

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
        head = os.pread(fd, PREFIX.size, 0)
        if len(head) < PREFIX.size:
            raise BadSegment(f"{path}: truncated: {len(head)} B, shorter than its {PREFIX.size} B prefix")
        magic, hlen, hcrc = PREFIX.unpack(head)
        if magic != MAGIC:
            raise BadSegment(f"{path}: not a kvconf segment (magic {magic!r}, expected {MAGIC!r})")
        if hlen > min(st.st_size, 64 << 20):
            raise BadSegment(f"{path}: a header of {hlen} B cannot be right (the file is {st.st_size} B)")
        raw = os.pread(fd, hlen, PREFIX.size)
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
        expected = PREFIX.size + hlen + header["data_bytes"]
        if st.st_size != expected:
            raise BadSegment(f"{path}: truncated or padded: {st.st_size} B on disk, {expected} B expected")
        header["_data_offset"] = PREFIX.size + hlen
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

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        super().register_kv_caches(kv_caches)
        on_cpu = all(v.device.type == "cpu" for v in self._views.values())
        self._pages = {n: v.numpy() for n, v in self._views.items()} if on_cpu else {}
        self._direct = (self.extra.direct_io and hasattr(os, "O_DIRECT") and bool(self._pages)
                        and all(p.ctypes.data % DIRECT_ALIGN == 0 and p.strides[0] % DIRECT_ALIGN == 0
                                and p.shape[1] % DIRECT_ALIGN == 0 for p in self._pages.values()))

    def _page(self, layer: str, block: int) -> Any:
        """Block ``block``'s page of ``layer``: the cache's own memory on CPU, else a host copy."""
        if self._pages:
            return memoryview(self._pages[layer][block])
        return memoryview(self._views[layer][block].cpu().numpy())

    # ---- reading segments, layer by layer (the tier's I/O thread) ------------------------------
    layered = True

    def _layer_at(self, header: dict[str, Any], layer: str) -> tuple[int, int, int]:
        """(index in the segment's layers, file offset of the layer's first page, page bytes)."""
        n_rows = len(header["keys"]) * self.chunk_blocks
        at = header["_data_offset"]
        for li, (name, page) in enumerate(self.layers):
            if name == layer:
                return li, at, page
            at += n_rows * page
        raise KeyError(layer)

    def _open_reads(self, ops: list[TierOp]) -> None:
        """The step's segments, opened and their headers checked, before the first layer is read."""
        by_file: dict[str, list[tuple[int, Chunk]]] = {}
        for op in ops:
            for c in op.chunks:
                path, idx = c.place
                by_file.setdefault(path, []).append((idx, c))
        reads: dict[str, dict[str, Any]] = {}
        for path, items in by_file.items():
            entry: dict[str, Any] = {"items": items, "fd": None, "header": None, "failed": None}
            try:
                self._check_dir(create=False)
                entry["fd"] = open_regular(path)
                entry["header"] = self.read_header(path, entry["fd"])
            except (BadSegment, OSError, ValueError, KeyError, TypeError) as exc:
                entry["failed"] = self._reason(path, exc)
            reads[path] = entry
        self._reads = (ops, reads)

    @staticmethod
    def _reason(path: str, exc: BaseException) -> str:
        return str(exc) if isinstance(exc, BadSegment) else f"{path}: {type(exc).__name__}: {exc}"

    def _fail_read(self, entry: dict[str, Any]) -> dict[int, str]:
        """Zeroes every block of a failed segment's chunks in every layer (nothing half loaded); its
        blocks, each with the reason."""
        errors: dict[int, str] = {}
        for _, c in entry["items"]:
            for name, _ in self.layers:
                if name in self._views:
                    self._views[name][self.ids_of(c, name)] = 0
            for b in {b for ids in c.block_ids for b in ids}:
                errors[b] = entry["failed"]
        return errors

    def _load_layer(self, ops: list[TierOp], layer: str) -> dict[int, str]:
        """One layer's pages of the step's segments, read straight into the blocks (``preadv`` of
        runs of adjacent pages), each page checked where it landed. A segment that fails its
        checks in any layer fails its chunks' blocks in every layer."""
        if self._reads is None or self._reads[0] is not ops:
            self._open_reads(ops)
        assert self._reads is not None
        reads = self._reads[1]
        errors: dict[int, str] = {}
        for path, entry in reads.items():
            if entry["failed"] is None:
                try:
                    self._read_layer(path, entry, layer)
                except (BadSegment, OSError, ValueError, KeyError, TypeError, IndexError) as exc:
                    entry["failed"] = self._reason(path, exc)
            if entry["failed"] is not None and not entry.get("reported"):  # once, in the layer it failed
                entry["reported"] = True
                errors.update(self._fail_read(entry))
        if layer == self._layer_order[-1]:  # the step's last layer: the files are done with
            for entry in reads.values():
                if entry["fd"] is not None:
                    os.close(entry["fd"])
                    entry["fd"] = None
            self._reads = None
        return errors

    def _read_layer(self, path: str, entry: dict[str, Any], layer: str) -> None:
        k = self.chunk_blocks
        header, fd = entry["header"], entry["fd"]
        li, at, page = self._layer_at(header, layer)
        pages = sorted((at + (idx * k + j) * page, self._page(layer, b), idx * k + j)
                       for idx, c in entry["items"] for j, b in enumerate(self.ids_of(c, layer)))
        start = 0
        while start < len(pages):  # runs of adjacent pages, one preadv each
            end = start + 1
            while (end < len(pages) and end - start < IOV_MAX
                   and pages[end][0] == pages[end - 1][0] + len(pages[end - 1][1])):
                end += 1
            bufs = [p[1] for p in pages[start:end]]
            want = sum(len(x) for x in bufs)
            if os.preadv(fd, bufs, pages[start][0]) != want:
                raise BadSegment(f"{path}: truncated: a short read in layer {layer}")
            start = end
        sums, keys = header["sums"], header["keys"]
        for _, buf, row in pages:
            label = row_labels(keys, layer, k, row, 1)[0] if self._mac else b""
            if page_hash(buf, self._mac, label) != sums[li][row]:
                raise BadSegment(f"{path}: checksum mismatch in layer {layer} (the file is corrupt"
                                 + (", or not written with this hmac_key_file)" if self._mac else ")"))
        if not self._pages:  # the pages were host copies: into the device's blocks
            import torch

            chunk_at = dict(entry["items"])
            for _, buf, row in pages:
                idx, j = divmod(row, k)
                self._views[layer][self.ids_of(chunk_at[idx], layer)[j]].copy_(torch.frombuffer(buf, dtype=torch.uint8))

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
        if self._writers is not None:
            self._writers.shutdown(wait=True)
            self._writers = None
        super().shutdown()
        self._pages = {}
        self._headers = OrderedDict()

