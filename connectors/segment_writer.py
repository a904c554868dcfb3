"""How the shared_storage connector writes a step's segments, layer by layer, on the tier's I/O
thread (a mixin of :class:`~kvconf_connectors.shared_storage.SharedStorageConnector`, which holds
the state it uses: the layers, the folder, the hash, the writers).

A request's segment is a temporary file opened when the step's saves begin, room set aside at its
start for the header; each layer the engine has computed is written at its place in the file
(``pwritev`` straight from the KV cache's pages, with ``O_DIRECT`` where the file system takes it)
and its pages hashed; once every layer is in, the header (padded with spaces to its room: JSON
allows them), ``fdatasync`` and the rename that makes the segment visible, whole or not at all.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import time
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from kvconf_connectors.segments import (
    DIRECT_ALIGN,
    MAGIC,
    PREFIX,
    VERSION,
    BadSegment,
    page_hash,
    pwrite_all,
    row_labels,
)
from kvconf_connectors.tier import TierOp

WRITERS = 4
"""Segments of one step synced at once."""


class SegmentWriter:
    """The write side of the shared_storage connector."""

    layers: list[tuple[str, int]]
    chunk_blocks: int
    layout: str
    dir: str
    capacity: Optional[int]
    _mac: Optional[bytes]
    _hash: str
    _direct: bool
    _writers: Optional[ThreadPoolExecutor]
    _writing: dict[str, dict[str, Any]]
    path_of: Callable[[bytes], str]
    ids_of: Callable[[Any, str], list[int]]
    _check_dir: Callable[..., None]
    _page: Callable[[str, int], Any]
    _evict: Callable[[], None]

    def _begin_save(self, ops: list[TierOp]) -> dict[str, str]:
        """A temporary file per request of the step, its header's room set aside (the header, with
        every page's hash, is written last, padded with spaces to that room: JSON allows them)."""
        self._writing = {}
        errors: dict[str, str] = {}
        for op in ops:
            try:
                self._writing[op.request_id] = self._open_segment(op)
            except OSError as exc:
                errors[op.request_id] = str(exc)
        return errors

    def _open_segment(self, op: TierOp) -> dict[str, Any]:
        keys = [c.key.hex() for c in op.chunks]
        n_rows = len(op.chunks) * self.chunk_blocks
        data_bytes = n_rows * sum(page for _, page in self.layers)
        widest = self._header_dict(keys, [[2**64 - 1] * n_rows for _ in self.layers], data_bytes)
        room = len(json.dumps(widest).encode()) + 64  # the time and the writer's name may grow a little
        path = self.path_of(op.chunks[0].key)
        try:
            self._check_dir(create=True)
        except BadSegment as exc:
            raise OSError(str(exc)) from None
        except OSError as exc:
            raise OSError(f"cannot write under {self.dir}: {exc.strerror or exc}") from None
        tmp = os.path.join(self.dir, f".{os.uname().nodename}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        fd, direct = -1, self._direct
        if direct:
            room += -(PREFIX.size + room) % DIRECT_ALIGN  # every page then lies at an aligned offset
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_DIRECT, 0o600)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise OSError(f"cannot write under {self.dir}: {exc.strerror or exc}") from None
                self._direct = direct = False  # the file system refused O_DIRECT: through the page cache
        if fd < 0:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except OSError as exc:
                raise OSError(f"cannot write under {self.dir}: {exc.strerror or exc}") from None
        return {"op": op, "keys": keys, "path": path, "tmp": tmp, "fd": fd, "direct": direct, "room": room,
                "data": PREFIX.size + room, "rows": n_rows, "data_bytes": data_bytes,
                "sums": [None] * len(self.layers), "failed": None}

    def _header_dict(self, keys: list[str], sums: list[Any], data_bytes: int) -> dict[str, Any]:
        return {"version": VERSION, "layout": self.layout, "layers": self.layers, "chunk_blocks": self.chunk_blocks,
                "keys": keys, "hash": self._hash, "sums": sums, "data_bytes": data_bytes,
                "written_by": f"{os.uname().nodename}:{os.getpid()}", "time": time.time()}

    def _save_layer(self, ops: list[TierOp], layer: str) -> dict[str, str]:
        """One layer's pages of each request's chunks, written straight from the KV cache's pages
        at their place in the request's segment, and hashed."""
        errors: dict[str, str] = {}
        for op in ops:
            seg = self._writing.get(op.request_id)
            if seg is None or seg["failed"] is not None:
                continue
            try:
                li = next(i for i, (n, _) in enumerate(self.layers) if n == layer)
                rows = [self._page(layer, b) for c in op.chunks for b in self.ids_of(c, layer)]
                labels = row_labels(seg["keys"], layer, self.chunk_blocks, 0, len(rows)) if self._mac else [b""] * len(rows)
                seg["sums"][li] = [page_hash(r, self._mac, lab) for r, lab in zip(rows, labels)]
                at = seg["data"] + sum(seg["rows"] * page for _, page in self.layers[:li])
                pwrite_all(seg["fd"], rows, at)
            except OSError as exc:
                if seg["direct"] and exc.errno == errno.EINVAL:
                    self._direct = False  # O_DIRECT refused on write: the next segments go through the page cache
                why = f"writing {seg['path']} failed: {exc.strerror or exc}"
                seg["failed"] = errors[op.request_id] = why
        return errors

    def _end_save(self, ops: list[TierOp], failed: dict[str, str]) -> dict[str, str]:
        """Each segment's header, then ``fdatasync`` and the rename that makes it visible (a reader
        sees a whole segment or none); segments of one step are synced side by side (``WRITERS``
        at a time: the file system commits their journal together)."""
        segs, self._writing = self._writing, {}

        def finish(seg: dict[str, Any]) -> Optional[str]:
            rid = seg["op"].request_id
            why: Optional[str] = failed.get(rid) or seg["failed"]
            if why is None and any(x is None for x in seg["sums"]):
                why = "a layer of the segment was not written"
            try:
                if why is None:
                    self._write_header(seg)
                    os.fdatasync(seg["fd"])
            except OSError as exc:
                why = f"writing {seg['path']} failed: {exc.strerror or exc}"
            finally:
                os.close(seg["fd"])
            if why is not None:
                with contextlib.suppress(OSError):
                    os.unlink(seg["tmp"])
                return why
            os.replace(seg["tmp"], seg["path"])
            return None

        todo = list(segs.values())
        if len(todo) > 1:
            if self._writers is None:
                self._writers = ThreadPoolExecutor(WRITERS, thread_name_prefix="kvconf-segment-writer")
            outcomes = list(self._writers.map(finish, todo))
        else:
            outcomes = [finish(seg) for seg in todo]
        if self.capacity is not None and any(o is None for o in outcomes):
            self._evict()
        return {seg["op"].request_id: why for seg, why in zip(todo, outcomes) if why is not None}

    def _write_header(self, seg: dict[str, Any]) -> None:
        raw = json.dumps(self._header_dict(seg["keys"], seg["sums"], seg["data_bytes"])).encode()
        if len(raw) > seg["room"]:
            raise OSError(f"the header of {seg['path']} outgrew its room ({len(raw)} > {seg['room']} B)")
        raw += b" " * (seg["room"] - len(raw))
        head = PREFIX.pack(MAGIC, len(raw), zlib.crc32(raw)) + raw
        if seg["direct"]:
            buf = mmap.mmap(-1, len(head))  # page-aligned memory, as O_DIRECT needs
            try:
                buf.write(head)
                pwrite_all(seg["fd"], [buf], 0)
            finally:
                buf.close()
        else:
            pwrite_all(seg["fd"], [head], 0)
