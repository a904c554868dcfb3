"""KV-cache layouts read from a model's ``config.json`` (``kv_cache.model=PATH``): the layer count,
KV heads, head size, dtype, which layers use a sliding window, MLA's latent size, and the longest
context (``max_position_embeddings``), for the model families vLLM plans most often. The JSON is read
directly: no transformers, no network.

====================================  ========================================================
``model_type``                        layers
====================================  ========================================================
llama, qwen3                          full attention
mistral, qwen2                        full attention, or all sliding-window when the config has
                                      one (qwen2: ``use_sliding_window``)
gemma2                                sliding window on even layers, full on odd (or
                                      ``layer_types``)
gemma3, gemma3_text                   full every ``sliding_window_pattern``-th layer, else
                                      sliding (or ``layer_types``; gemma3 reads ``text_config``)
gpt_oss                               ``layer_types`` (sliding and full, alternating)
deepseek_v2, deepseek_v3              MLA: one latent of ``kv_lora_rank + qk_rope_head_dim``
====================================  ========================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvconf.errors import Problem, short

from .kvcache import DTYPE_BYTES, KVCacheInvariantError

__all__ = ["MODEL_TYPES", "layout_from_model", "read_model_config"]

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text", "gpt_oss", "deepseek_v2",
               "deepseek_v3")
"""The ``model_type`` values kvconf reads."""

_PATH = "kv_cache.model"



def shipped() -> Path:
    """The folder of the model configs kvconf ships (``conf/models``, in the package ``kvconf.conf``):
    ``kv_cache.model`` may name one (``llama3_8b``) instead of giving a path."""
    import importlib.resources

    return Path(str(importlib.resources.files("kvconf.conf"))) / "models"


def _problem(message: str, value: Any, fix: str) -> KVCacheInvariantError:
    return KVCacheInvariantError([Problem(_PATH, message, value=value, fix=fix)])


def read_model_config(path: str) -> tuple[dict[str, Any], Path]:
    """The JSON of ``path`` (a ``config.json``, or a folder holding one) and the file read."""
    p = Path(path).expanduser()
    if not p.exists() and path and "/" not in path and (shipped() / path / "config.json").is_file():
        p = shipped() / path  # a model kvconf ships (conf/models/NAME)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise _problem(f"no config.json at {str(p)!r}", path,
                       "give the path of a model's config.json, or of the folder that holds it")
    from .inputs import Refused, read_json

    try:
        data = read_json(file)
    except Refused as exc:
        raise _problem(f"{exc.label}:{exc.line}: {exc.message}", path, "give a model's config.json") from None
    if not isinstance(data, dict):
        raise _problem(f"{file} holds {type(data).__name__}, not a model config", path, "give a model's config.json")
    return data, file


def _field(cfg: dict[str, Any], file: Path, key: str, *alternatives: str) -> Any:
    for k in (key, *alternatives):
        if cfg.get(k) is not None:
            return cfg[k]
    raise _problem(f"{file} has no {key!r}, which a {cfg.get('model_type')} layout needs", key,
                   f"add {key!r} to the config.json, or write the layout by hand (kv_cache.groups)")


_BOUNDS = {"num_hidden_layers": (4096, "no model has that many layers"),
           "max_position_embeddings": (2**31, "vLLM's positions are 32-bit"),
           "kv_lora_rank": (4096, "no model's MLA latent comes near it"),
           "qk_rope_head_dim": (4096, "no model's heads come near it"),
           "num_attention_heads": (1 << 16, "no model has that many heads"),
           "num_key_value_heads": (1024, "no model has that many KV heads"),
           "head_dim": (4096, "no model's heads come near it"),
           "hidden_size": (1 << 20, "no model is that wide")}
"""The most kvconf reads of each number in a config.json, and why (sizes no model has are refused
before anything is built from them: 10^9 layers would be a list of 10^9 names)."""


def _int(cfg: dict[str, Any], file: Path, key: str) -> int:
    """``cfg[key]`` as a whole number from 1 to its bound (:data:`_BOUNDS`), or the problem."""
    value = _field(cfg, file, key)
    bound, why = _BOUNDS[key]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _problem(f"{file}'s {key} is {short(value, 40)}, not a whole number", value,
                       f"give {key} as a whole number in the config.json")
    if not 1 <= value <= bound:
        raise _problem(f"{file}'s {key} is {value:,}: " + (f"above kvconf's bound of {bound:,} ({why})" if value > 0
                                                           else "not a positive number"), value,
                       f"give the model's real {key}")
    return value


def layout_from_model(path: str) -> dict[str, Any]:
    """The compact layout's fields that ``path``'s config.json determines: ``num_layers``,
    ``groups``, ``dtype`` and ``max_model_len`` (``max_position_embeddings``)."""
    top, file = read_model_config(path)
    model_type = top.get("model_type")
    cfg = top.get("text_config") or top if model_type == "gemma3" else top
    if model_type not in MODEL_TYPES:
        raise KVCacheInvariantError([Problem(
            _PATH, f"{file} is a {model_type!r} model, which kvconf cannot read a layout from",
            value=model_type, allowed=list(MODEL_TYPES),
            fix="write the layout by hand (kv_cache.num_layers and kv_cache.groups)")])
    layers = _int(cfg, file, "num_hidden_layers")
    out: dict[str, Any] = {"num_layers": layers}
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or top.get("torch_dtype")
    if dtype is not None:
        if dtype not in DTYPE_BYTES:
            raise _problem(f"{file}'s torch_dtype {dtype!r} is not a KV-cache dtype kvconf knows", dtype,
                           "set kv_cache.dtype explicitly")
        out["dtype"] = dtype
    if cfg.get("max_position_embeddings") is not None:
        out["max_model_len"] = _int(cfg, file, "max_position_embeddings")
    if model_type in ("deepseek_v2", "deepseek_v3"):
        latent = _int(cfg, file, "kv_lora_rank") + _int(cfg, file, "qk_rope_head_dim")
        out["groups"] = [{"type": "mla", "layers": "all", "head_size": latent}]
        return out
    heads = _int(cfg, file, "num_attention_heads")
    kv_heads = _int(cfg, file, "num_key_value_heads") if cfg.get("num_key_value_heads") else heads
    head = _int(cfg, file, "head_dim") if cfg.get("head_dim") else _int(cfg, file, "hidden_size") // heads
    full = {"type": "full_attention", "num_kv_heads": kv_heads, "head_size": head}
    window = cfg.get("sliding_window")
    sliding = {"type": "sliding_window", "num_kv_heads": kv_heads, "head_size": head, "sliding_window": window}
    kinds = _layer_kinds(model_type, cfg, file, layers, window)
    full_layers = [i for i, k in enumerate(kinds) if k == "full"]
    sliding_layers = [i for i, k in enumerate(kinds) if k == "sliding"]
    if sliding_layers and not window:
        raise _problem(f"{file} has sliding-window layers but no 'sliding_window'", "sliding_window",
                       "add 'sliding_window' to the config.json")
    out["groups"] = ([{**full, "layers": full_layers}] if full_layers else []) + (
        [{**sliding, "layers": sliding_layers}] if sliding_layers else [])
    return out


def _layer_kinds(model_type: str, cfg: dict[str, Any], file: Path, layers: int, window: Any) -> list[str]:
    """``full`` or ``sliding`` for each layer."""
    types = cfg.get("layer_types")
    if isinstance(types, list):
        if len(types) != layers:
            raise _problem(f"{file}'s layer_types lists {len(types)} layers, num_hidden_layers {layers}",
                           len(types), "make layer_types one entry per layer")
        return ["sliding" if "sliding" in str(t) else "full" for t in types]
    if model_type == "gpt_oss":
        return ["sliding" if i % 2 == 0 else "full" for i in range(layers)]
    if model_type == "gemma2":
        return ["sliding" if i % 2 == 0 else "full" for i in range(layers)]
    if model_type in ("gemma3", "gemma3_text"):
        pattern = int(cfg.get("sliding_window_pattern") or 6)
        return ["full" if (i + 1) % pattern == 0 else "sliding" for i in range(layers)]
    if model_type == "qwen2" and not cfg.get("use_sliding_window"):
        return ["full"] * layers
    if model_type in ("mistral", "qwen2") and window:
        return ["sliding"] * layers
    return ["full"] * layers
