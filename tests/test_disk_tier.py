"""The disk tier cannot serve corrupt bytes (#13): a real page hash, regular files only, a strict
header, a layout folder that is no symlink, a per-user default folder, orphans removed."""

from __future__ import annotations

import errno
import json
import os
import zlib
from pathlib import Path

import pytest
from test_tiers import Engine, load_errors, prompt, saved_store, segments

from conftest import json_out, run_kvconf
from kvconf.config.layout import KVCacheLayout
from kvconf_connectors.segments import MAGIC, PREFIX
from kvconf_connectors.shared_storage import SharedStorageConnector

pytestmark = pytest.mark.torch


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_two_swapped_words_fail_by_policy_naming_the_file(policy, workdir, tmp_path):
    store = f"connector.extra.shared_storage_path={tmp_path / 'kv'}"
    assert run_kvconf("connector=shared_storage", store, cwd=workdir).returncode == 0
    victim = segments(tmp_path / "kv")[0]
    data = bytearray(victim.read_bytes())
    i = len(data) - 4096  # inside the last layer's pages
    while data[i:i + 8] == data[i + 8:i + 16]:
        i += 8
    data[i:i + 8], data[i + 8:i + 16] = data[i + 8:i + 16], data[i:i + 8]
    victim.write_bytes(data)
    proc = run_kvconf("connector=shared_storage", store, f"connector.kv_load_failure_policy={policy}", "output=json",
                      cwd=workdir)
    if policy == "fail":
        assert proc.returncode == 1 and str(victim) in proc.stderr and "checksum mismatch" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        st = json_out(proc)["self_test"]
        assert st["verified"] and any(str(victim) in why for why in st["recomputed"].values())


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_a_fifo_or_symlink_at_a_segment_path_is_a_load_failure_not_a_hang(kind, policy, workdir, tmp_path):
    store = f"connector.extra.shared_storage_path={tmp_path / 'kv'}"
    assert run_kvconf("connector=shared_storage", store, cwd=workdir).returncode == 0
    victim = segments(tmp_path / "kv")[0]
    victim.unlink()
    if kind == "fifo":
        os.mkfifo(victim)
    else:
        outside = tmp_path / "elsewhere.kvseg"
        outside.write_bytes(b"not yours")
        victim.symlink_to(outside)
    proc = run_kvconf("connector=shared_storage", store, f"connector.kv_load_failure_policy={policy}", "output=json",
                      cwd=workdir, timeout=120)
    if policy == "fail":
        assert proc.returncode == 1 and str(victim) in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert any(str(victim) in why for why in json_out(proc)["self_test"]["recomputed"].values())


def rewrite_header(seg: Path, header: object) -> None:
    data = seg.read_bytes()
    magic, hlen, _ = PREFIX.unpack(data[:PREFIX.size])
    raw = json.dumps(header).encode()
    seg.write_bytes(PREFIX.pack(MAGIC, len(raw), zlib.crc32(raw)) + raw + data[PREFIX.size + hlen:])


@pytest.mark.parametrize("header", [
    {"version": 2, "layout": 7, "keys": "x"},             # wrong types (once: TypeError)
    [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],  # not an object
    {"version": 2},                                        # fields missing
])
def test_a_malformed_header_with_a_valid_checksum_is_a_load_failure(header, tmp_path):
    seg = saved_store(tmp_path)
    rewrite_header(seg, header)
    _, errors = load_errors(tmp_path)
    assert errors and all(str(seg) in why and "malformed header" in why for why in errors.values())


def test_a_deeply_nested_header_is_a_load_failure_not_a_crash(tmp_path):
    seg = saved_store(tmp_path)
    data = seg.read_bytes()
    _, hlen, _ = PREFIX.unpack(data[:PREFIX.size])
    raw = b"[" * 100_000 + b"]" * 100_000
    seg.write_bytes(PREFIX.pack(MAGIC, len(raw), zlib.crc32(raw)) + raw + data[PREFIX.size + hlen:])
    _, errors = load_errors(tmp_path)
    assert errors and str(seg) in next(iter(errors.values()))


def test_a_symlinked_layout_folder_is_refused_and_eviction_deletes_nothing_where_it_points(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    for i in range(3):
        (precious / f"{i:02x}.kvseg").write_bytes(b"x" * 8192)
    store = tmp_path / "store"
    eng = Engine(SharedStorageConnector, store, capacity="1KiB")
    try:
        Path(eng.worker.root).mkdir(parents=True, exist_ok=True)
        Path(eng.worker.dir).symlink_to(precious)
        eng.step("a", prompt(1, 3), [0, 1, 2], fill=5)
        errors = eng.worker.get_save_errors()
        assert "symbolic link" in errors["a"] and str(eng.worker.dir) in errors["a"]
    finally:
        eng.close()
    assert sorted(p.name for p in precious.iterdir()) == ["00.kvseg", "01.kvseg", "02.kvseg"]


def test_orphaned_temporary_files_of_dead_writers_are_removed_at_start(tmp_path):
    seg = saved_store(tmp_path)
    host = os.uname().nodename
    dead = seg.parent / f".{host}.999999999.{'ab' * 16}.tmp"
    alive = seg.parent / f".{host}.{os.getpid()}.{'cd' * 16}.tmp"
    dead.write_bytes(b"half a segment")
    alive.write_bytes(b"being written")
    eng = Engine(SharedStorageConnector, tmp_path)
    eng.close()
    assert not dead.exists() and alive.exists()


def test_the_default_folder_is_per_user_and_private(workdir, tmp_path):
    cache = tmp_path / "cache"
    from conftest import kvconf_env

    proc = run_kvconf("connector=shared_storage", cwd=workdir, env=kvconf_env(XDG_CACHE_HOME=str(cache)))
    assert proc.returncode == 0, proc.stderr
    root = cache / "kvconf" / "shared_storage"
    assert segments(root) and (root.stat().st_mode & 0o777) == 0o700


def test_the_page_hash_sees_swapped_words():
    from kvconf_connectors.segments import page_hash

    page = bytes(range(64))
    swapped = page[8:16] + page[0:8] + page[16:]
    assert page_hash(page) != page_hash(swapped)


def read_header(seg: Path) -> dict:
    data = seg.read_bytes()
    _, hlen, _ = PREFIX.unpack(data[:PREFIX.size])
    return json.loads(data[PREFIX.size:PREFIX.size + hlen])


def secret(tmp_path: Path, name: str = "hmac.key") -> Path:
    path = tmp_path / name
    path.write_text(os.urandom(24).hex())
    path.chmod(0o600)
    return path


def test_segments_written_with_an_hmac_key_load_with_it_and_carry_keyed_hashes(workdir, tmp_path):
    store = f"connector.extra.shared_storage_path={tmp_path / 'kv'}"
    key = f"connector.extra.hmac_key_file={secret(tmp_path)}"
    first = run_kvconf("connector=shared_storage", store, key, cwd=workdir)
    assert first.returncode == 0, first.stderr
    assert read_header(segments(tmp_path / "kv")[0])["hash"] == "blake2b-64-keyed"
    again = run_kvconf("connector=shared_storage", store, key, "output=json", cwd=workdir)
    assert again.returncode == 0, again.stderr
    st = json_out(again)["self_test"]
    assert st["verified"] and st["hits"] > 0


def keyed(key: Path | None) -> dict:
    """The settings of a connector with ``hmac_key_file=key`` (None: without one)."""
    return {"hmac_key_file": str(key)} if key else {}


@pytest.mark.parametrize("forgery", ["unauthenticated", "hashes-recomputed-without-the-key", "keys-moved"])
def test_a_forged_segment_is_refused_when_segments_are_authenticated(forgery, tmp_path):
    import hashlib

    key = secret(tmp_path)
    store = tmp_path / "kv"
    if forgery == "unauthenticated":  # written by someone without the key: plain hashes
        victim = saved_store(store)
        says = "unauthenticated segment is not read"
    else:
        victim = saved_store(store, **keyed(key))
        header = read_header(victim)
        if forgery == "keys-moved":  # the same pages, claimed for other chunks of the prompt
            header["keys"] = header["keys"][::-1]
        else:  # an altered page, its hash recomputed under a key of the forger's own
            data = bytearray(victim.read_bytes())
            data[-100] ^= 0xFF
            victim.write_bytes(data)
            tail = bytes(data[len(data) - header["layers"][-1][1]:])
            header["sums"][-1][-1] = int.from_bytes(hashlib.blake2b(b"x" + tail, key=b"forger" * 4,
                                                                    digest_size=8).digest(), "little")
        rewrite_header(victim, header)
        says = "not written with this hmac_key_file"
    _, errors = load_errors(store, **keyed(key))
    assert errors and all(str(victim) in why and says in why for why in errors.values()), errors


def test_a_keyed_segment_without_the_key_is_a_load_failure_saying_so(tmp_path):
    victim = saved_store(tmp_path, **keyed(secret(tmp_path)))
    _, errors = load_errors(tmp_path)
    assert errors and all(str(victim) in why and "no hmac_key_file" in why for why in errors.values())


def test_an_hmac_key_file_others_can_read_is_a_config_error(workdir, tmp_path):
    path = secret(tmp_path)
    path.chmod(0o644)
    proc = run_kvconf("connector=shared_storage", f"connector.extra.hmac_key_file={path}", "action=check",
                      cwd=workdir)
    assert proc.returncode == 2 and "connector.extra.hmac_key_file" in proc.stderr and "chmod 600" in proc.stderr


def _headers(store: Path) -> list[bytes]:
    """Each segment's header bytes (after the prefix)."""
    out = []
    for seg in segments(store):
        with seg.open("rb") as f:
            _, hlen, _ = PREFIX.unpack(f.read(PREFIX.size))
            out.append(f.read(hlen))
    return out


ALIGNED_CACHE = ("kv_cache=tiny", "kv_cache.num_blocks=1024")  # 32 MiB: a huge-page buffer, 8 KiB pages


def test_segments_go_past_the_page_cache_and_read_back_either_way(workdir, tmp_path):
    """direct_io (the default): every segment's pages start on a 4 KiB boundary (its header padded
    with spaces, as O_DIRECT needs), and they load; direct_io=false writes plain segments that
    load too, and each kind is read by the other setting."""
    direct, plain = tmp_path / "direct", tmp_path / "plain"
    for store, flag in ((direct, "true"), (plain, "false")):
        proc = run_kvconf("connector=shared_storage", *ALIGNED_CACHE, f"connector.extra.shared_storage_path={store}",
                          f"connector.extra.direct_io={flag}", "output=json", cwd=workdir)
        assert proc.returncode == 0, proc.stderr
        assert json_out(proc)["self_test"]["verified"] is True
    padded, unpadded = _headers(direct), _headers(plain)
    assert padded and all((PREFIX.size + len(h)) % 4096 == 0 and h.endswith(b" ") for h in padded)
    # through the page cache a header keeps only the room set aside for its hashes: not 4 KiB aligned
    assert unpadded and not all((PREFIX.size + len(h)) % 4096 == 0 for h in unpadded)
    for store, flag in ((direct, "false"), (plain, "true")):  # a second run finds the first one's blocks
        proc = run_kvconf("connector=shared_storage", *ALIGNED_CACHE, f"connector.extra.shared_storage_path={store}",
                          f"connector.extra.direct_io={flag}", "output=json", cwd=workdir)
        assert proc.returncode == 0, proc.stderr
        st = json_out(proc)["self_test"]
        assert st["verified"] is True and st["preexisting_hits"] > 0


def test_where_the_file_system_refuses_o_direct_segments_go_through_the_page_cache(tmp_path, monkeypatch):
    """A file system that refuses O_DIRECT (EINVAL at open, as ZFS and older tmpfs do; refused
    here by patching ``os.open``, since every file system this machine has takes it): the save
    still succeeds, as a plain segment, the blocks load, and later saves do not ask again."""
    from kvconf.config.models import ConnectorConfig, SelfTestConfig
    from kvconf.contract.api import KVConnectorRole
    from kvconf.runtime.allocate import allocate, layer_views
    from kvconf.runtime.engine import run_self_test

    cfg = KVCacheLayout(num_layers=4, block_size=16, dtype="float16", num_blocks=1024,
                        groups=[{"type": "full_attention", "num_kv_heads": 2, "head_size": 64}]).to_config()
    store = tmp_path / "kv"
    conn = SharedStorageConnector(ConnectorConfig(name="shared_storage", kv_role="kv_both", engine_id="e",
                                                  extra={"shared_storage_path": str(store)}),
                                  KVConnectorRole.WORKER, cfg)
    buffers = allocate(cfg, "cpu")
    conn.register_kv_caches(layer_views(cfg, buffers))
    asked = []
    real_open = os.open

    def no_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            asked.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_direct)
    try:
        out = run_self_test(conn, layer_views(cfg, buffers), SelfTestConfig(requests=4))
    finally:
        monkeypatch.undo()
        conn.shutdown()
    assert out["verified"] is True and out["saved_bytes"] > 0
    headers = _headers(store)
    assert len(asked) == 1 and len(headers) > 1  # asked once; every segment then went through the cache
    assert not all((PREFIX.size + len(h)) % 4096 == 0 for h in headers)  # not aligned for O_DIRECT
