"""The validated config: frozen pydantic models, unknown keys rejected everywhere.

:func:`validate` turns the composed config (plain data) into a :class:`KVConfConfig` or raises one
:class:`~kvconf.errors.ConfigError` listing every problem, each with its config path
(``connector.kv_role``, never a union tag), the value, what is allowed and the fix.
"""


import re
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    PositiveInt,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from kvconf.errors import ConfigError, Problem, short
from kvconf.units import MemoryBytes

from .base import StrictModel
from .diagnostics import problems_from_validation_error
from .kvcache import KVCacheConfig
from .layout import KVCacheLayout

__all__ = [
    "Action",
    "ConnectorConfig",
    "KVConfConfig",
    "KVRole",
    "LoadFailurePolicy",
    "Output",
    "RoleName",
    "BenchConfig",
    "SelfTestConfig",
    "validate",
    "validate_extra",
]

KVProducer = Literal["kv_producer"]
KVConsumer = Literal["kv_consumer"]
KVBoth = Literal["kv_both"]
KVRole = Literal[KVProducer, KVConsumer, KVBoth]
"""Data direction: a producer (prefill) sends KV, a consumer (decode) receives it, both does both."""

Scheduler = Literal["scheduler"]
Worker = Literal["worker"]
RoleName = Literal[Scheduler, Worker]
"""Process side, as vLLM's ``KVConnectorRole``: the scheduler plans, a worker holds KV memory."""

Fail = Literal["fail"]
Recompute = Literal["recompute"]
LoadFailurePolicy = Literal[Fail, Recompute]

Check = Literal["check"]
Run = Literal["run"]
Export = Literal["export"]
Serve = Literal["serve"]
Bench = Literal["bench"]
BenchEngine = Literal["kvconf", "vllm"]
BenchPass = Literal["save", "hit", "miss"]
Proxy = Literal["proxy"]
Action = Literal[Check, Run, Export, Serve, Bench, Proxy]

Text = Literal["text"]
Json = Literal["json"]
Output = Literal[Text, Json]

BufferDevice = Literal["cpu", "cuda", "xpu"]

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DEVICES_ALLOWED = ("auto", "cpu", "cuda", "cuda:N")


class ConnectorConfig(StrictModel):
    """Which connector, in which data direction, with which settings (vLLM's ``KVTransferConfig``)."""

    name: str = Field(min_length=1)
    """A registered connector name (``example``, ``mooncake``, ...), or the class name inside
    ``module_path``."""
    module_path: str | None = Field(None, json_schema_extra={"pattern": r"\S"})
    """Importable module holding the class ``name``; when set it wins over the registry (as in vLLM
    since PR #38301). Leave it unset (null) to use the registry; an empty string is an error."""
    kv_role: KVRole
    """Data direction: ``kv_producer`` (prefill, sends KV), ``kv_consumer`` (decode, receives KV) or
    ``kv_both``. Not the process side: that is ``role``."""
    engine_id: str | None = None
    """Identifier of this engine instance; a fresh uuid4 when unset."""
    kv_buffer_device: BufferDevice | None = None
    """Device of the KV transfer buffer (vLLM's field); unset means the device's type."""
    kv_port: int = Field(14579, ge=1, le=65535)
    """Port for connectors that use a fixed one (vLLM's field; mooncake and nixl pick their own)."""
    kv_load_failure_policy: LoadFailurePolicy = "fail"
    """What a failed KV load does to its request: ``fail`` it, or ``recompute`` its prefill."""
    enable_permute_local_kv: bool = False
    """vLLM's experimental HND-to-NHD permutation of transferred KV (passed on by ``action=export``;
    kvconf's connectors do not read it)."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """The connector's own settings; a built-in connector validates them with its own model, so a
    misspelt key is an error rather than silently ignored (vLLM's ``kv_connector_extra_config``)."""
    vllm_extra_config: dict[str, Any] = Field(default_factory=dict)
    """Keys of vLLM's ``kv_connector_extra_config`` that vLLM's connector of this kind reads and
    kvconf's does not (NIXL's ``enforce_handshake_compat``, Mooncake's ``bootstrap_server_address``):
    checked against the keys vLLM's connector reads, and passed through unchanged by
    ``action=export`` (``kvconf import`` puts them here)."""

    @field_validator("module_path")
    @classmethod
    def _module_path(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError(
                "module_path cannot be an empty string; fix: remove it (or set it to null) to use the "
                "registry, or give an importable module such as my_pkg.my_connector"
            )
        return v

    _engine_id_given: bool = PrivateAttr(default=False)

    @model_validator(mode="after")
    def _engine_id(self) -> "ConnectorConfig":
        self._engine_id_given = self.engine_id is not None
        if self.engine_id is None:
            object.__setattr__(self, "engine_id", str(uuid.uuid4()))
        return self

    @property
    def engine_id_given(self) -> bool:
        """Whether ``engine_id`` was written in the config rather than generated."""
        return self._engine_id_given


class SelfTestConfig(StrictModel):
    """How much ``action=run`` moves through the connector to prove it works."""

    requests: PositiveInt = 4
    """Requests the driver saves and loads back."""
    max_bytes: MemoryBytes = "64MiB"
    """Upper bound of the bytes one save or load pass moves; the driver uses fewer blocks when the
    cache is smaller."""
    transfer_bytes: MemoryBytes = "64MiB"
    """Bytes a two-process self-test (mooncake) moves in all, in rounds that each fit the KV cache."""
    timeout: float = Field(120.0, gt=0, allow_inf_nan=False)
    """Seconds a two-process self-test may take before it gives up on its peer."""


class BenchConfig(StrictModel):
    """The synthetic workload of ``action=bench``; the workload's sizes are ``self_test``'s."""

    requests: Optional[PositiveInt] = None
    """Requests per repetition; unset: ``self_test.requests``."""
    prompt_blocks: Optional[PositiveInt] = None
    """Prompt length, in KV blocks per request; unset: as many as the cache and ``self_test`` sizes allow."""
    concurrency: Optional[PositiveInt] = None
    """Requests scheduled in one engine step (tiers) or in flight at once (mooncake, nixl); unset:
    for the tiers as many as ``kv_cache.max_num_batched_tokens`` holds (vLLM's scheduler batches
    prefills so), for the peer-to-peer connectors every request of a round."""
    shared_prefix: float = Field(0.5, ge=0.0, le=1.0)
    """Fraction of each prompt's blocks that all requests share (prefix reuse for the tiers)."""
    repetitions: PositiveInt = 5
    """Measured repetitions of the workload (the figures are their medians: with five, two that
    meet a disk's stall or a noisy minute do not move them; with three, two did)."""
    min_seconds: float = Field(0.2, ge=0.0, le=3600.0, allow_inf_nan=False)
    """Each repetition runs the workload in rounds (fresh prompts each) until it has taken this
    long: a small cache's round takes a millisecond, too short to time alone."""
    warmup: int = Field(1, ge=0)
    """Unmeasured repetitions first."""
    raw: bool = True
    """Measure the raw path under the connector on the same bytes, and the ratio connector/raw."""
    ceilings: bool = True
    """Measure this machine's limits on the same bytes beside the figures (memcpy, a raw file
    written with fsync and read cold and warm, loopback TCP), and ``ceiling_ratio``."""
    reuse_store: bool = False
    """Benchmark in the connector's configured store (a disk tier's folder). Unset: a fresh private
    store beside it, removed afterwards, so that a rerun measures the same work and never loads
    what an earlier run left."""
    cold_loads: bool = True
    """Drop a disk tier's files from the OS page cache before the load pass, so that loads read the
    device; false measures loads from the page cache."""
    engine: BenchEngine = "kvconf"
    """``kvconf``: the connector under kvconf's own engine simulator (bytes per second against the
    raw path). ``vllm``: the connector inside the real vLLM, through kvconf's plug-in: time to first
    token and decode throughput per pass (save, hit, all-miss), beside vLLM without a connector and
    vLLM's own connector for the same job (:mod:`kvconf.bench.in_vllm`)."""
    model: Optional[str] = Field(None, min_length=1, max_length=4096)
    """``engine=vllm``: a model folder (config.json, weights; a tokenizer is not needed). Unset: a
    random model built from ``kv_cache.model``'s config.json (seeded, cached under
    ``$XDG_CACHE_HOME/kvconf/models``)."""
    prompt_tokens: Annotated[list[Annotated[int, Field(ge=64, le=131072)]], Field(min_length=1, max_length=16)] = [
        4096]
    """``engine=vllm``: prompt lengths, in tokens; each length is a workload of its own."""
    passes: Annotated[list[BenchPass], Field(min_length=1, max_length=3)] = ["save", "hit", "miss"]
    """``engine=vllm``: which passes run (``[miss]``: the cost of requests that never hit alone,
    cheaply repeated); ``hit`` loads what ``save`` stored, so it needs ``save``."""
    output_tokens: int = Field(32, ge=2, le=4096)
    """``engine=vllm``: tokens generated per request (the decode throughput's)."""
    baselines: bool = True
    """``engine=vllm``: also run the workload without a connector and with vLLM's own connector for
    the same job, where one runs on this host."""

    @field_validator("passes")
    @classmethod
    def _hit_needs_save(cls, v: list[str]) -> list[str]:
        if "hit" in v and "save" not in v:
            raise ValueError("the hit pass loads what the save pass stored; fix: bench.passes=[save,hit] (or add save)")
        return v

    @field_validator("prompt_tokens", mode="before")
    @classmethod
    def _one_length(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) and not isinstance(v, bool) else v


ExportTarget = Literal["vllm", "kvconf"]


class ExportConfig(StrictModel):
    """What ``action=export`` prints."""

    target: ExportTarget = "vllm"
    """``vllm``: the ``--kv-transfer-config`` of vLLM's own connector of this kind (its registered
    name and the extra keys it reads). ``kvconf``: the one that runs kvconf's connector itself in
    vLLM, through kvconf's plug-in (``kv_connector_module_path: kvconf.vllm``), its validated tree
    in ``kv_connector_extra_config``."""


def urlsplit_base(url: str) -> str:
    """``scheme://host:port`` of ``url`` (its path dropped).

    >>> urlsplit_base("http://127.0.0.1:8100/v1/completions")
    'http://127.0.0.1:8100'
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


_URL = re.compile(r"^https?://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?/?$")


class ProxyConfig(StrictModel):
    """``action=proxy``: an OpenAI-compatible front for prefill/decode instances (vLLM servers
    started with kvconf's exported JSON, kv_producer and kv_consumer)."""

    prefill: list[str] = Field(default_factory=list)
    """Base URLs of the prefill instances (``http://host:port``), taken in turn."""
    decode: list[str] = Field(default_factory=list)
    """Base URLs of the decode instances, taken in turn."""
    host: str = "127.0.0.1"
    """Where the proxy listens (127.0.0.1: this machine only; 0.0.0.0: every interface)."""
    port: int = Field(8000, ge=0, le=65535)
    """Its port (0: a free one, printed)."""
    timeout: float = Field(600.0, gt=0)
    """Seconds an instance may take to answer (the prefill), or between two pieces of the
    decode's answer, before the request fails with 504."""
    connect_timeout: float = Field(5.0, gt=0)
    """Seconds to connect to an instance before the request fails with 502."""

    @field_validator("prefill", "decode")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if not _URL.match(url):
                fixed = url if "://" in url else f"http://{url}"
                raise ValueError(f"{url!r} is not an instance's base URL; allowed: http://HOST:PORT, "
                                 f"https://HOST:PORT (no path); fix: write {urlsplit_base(fixed)}")
        return [u.rstrip("/") for u in v]


def _kv_cache_form(v: Any) -> str:
    return "explicit" if isinstance(v, dict) and "kv_cache_groups" in v else "compact"


KVCacheInput = Annotated[
    Union[Annotated[KVCacheLayout, Tag("compact")], Annotated[KVCacheConfig, Tag("explicit")]],
    Discriminator(_kv_cache_form),
]
"""The ``kv_cache`` group: the compact form, or an explicit KVCacheConfig (it has ``kv_cache_groups``)."""


class KVCacheGroupFile(StrictModel):
    """What a ``kv_cache/*.yaml`` file holds, under its group's key."""

    kv_cache: KVCacheInput


class KVConfConfig(StrictModel):
    """One kvconf job: a connector, a process side, a KV-cache layout, a device and an action."""

    connector: ConnectorConfig
    """The connector (config group ``connector``)."""
    role: RoleName
    """Process side: ``scheduler`` (plans, never allocates KV memory) or ``worker`` (allocates and
    registers the KV cache). Config group ``role``."""
    kv_cache: KVCacheInput
    """The KV-cache layout (config group ``kv_cache``): compact (``groups`` and ``num_blocks`` or
    ``memory``) or an explicit KVCacheConfig (``num_blocks``, ``kv_cache_tensors``,
    ``kv_cache_groups``)."""
    device: str = Field("auto", json_schema_extra={"pattern": _DEVICE.pattern})
    """Where the KV cache lives: ``auto`` (the first GPU if there is one, else ``cpu``), ``cpu``,
    ``cuda`` or ``cuda:N``."""
    action: Action = "run"
    """What to do: ``check`` (validate, resolve, contract, plan; allocate nothing), ``run``
    (construct, register, self-test, shut down), ``export`` (print vLLM's --kv-transfer-config) or
    ``serve`` (a long-lived producer for consumers started separately, until SIGINT or SIGTERM) or
    ``bench`` (repetitions of the self-test against the raw path; writes results.json) or ``proxy``
    (an OpenAI-compatible front for prefill/decode vLLM instances, ``proxy.*``, until SIGINT or
    SIGTERM)."""
    output: Output = "text"
    """``text`` for people, ``json`` for one JSON object on stdout."""
    debug: bool = False
    """Print a traceback with errors (so does ``HYDRA_FULL_ERROR=1``)."""
    self_test: SelfTestConfig = Field(default_factory=SelfTestConfig)
    """Sizes of the ``action=run`` self-test (and of each ``action=bench`` repetition)."""
    bench: BenchConfig = Field(default_factory=BenchConfig)
    """Repetitions and comparisons of ``action=bench``."""
    export: ExportConfig = Field(default_factory=ExportConfig)
    """What ``action=export`` prints."""
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    """The instances and the address of ``action=proxy``."""

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError(f"unsupported device {v!r}; allowed: {', '.join(DEVICES_ALLOWED)}")
        return v

    @property
    def kv_cache_config(self) -> KVCacheConfig:
        """The full KVCacheConfig, derived from the compact form when that is what was written."""
        return self.kv_cache_config_for(hybrid=True)

    def kv_cache_config_for(self, hybrid: bool) -> KVCacheConfig:
        """The KVCacheConfig vLLM makes for a connector that supports hybrid KV-cache groups
        (``hybrid``), or for one that does not (vLLM then disables its hybrid KV-cache manager)."""
        kv = self.kv_cache
        return kv.to_config(hybrid) if isinstance(kv, KVCacheLayout) else kv


def validate(data: dict[str, Any]) -> KVConfConfig:
    """The validated config, or a :class:`ConfigError` with every problem in ``data``."""
    try:
        return KVConfConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(problems_from_validation_error(exc, KVConfConfig, data)) from None


def validate_extra(model: type[BaseModel] | None, extra: Any) -> Any:
    """A connector's ``extra`` settings checked by its own model (an instance of it, defaults
    filled in), or as a plain dict where the connector has none; a :class:`ConfigError` naming
    each ``connector.extra.*`` problem otherwise. A key the model does not have is refused whether
    or not the model says ``extra="forbid"`` (pydantic's default, ``"ignore"``, would drop a
    misspelt setting silently); only a model that says ``extra="allow"`` takes keys of its own.

    >>> validate_extra(None, {"anything": 1})
    {'anything': 1}
    >>> from pydantic import BaseModel
    >>> class Settings(BaseModel):
    ...     max_entries: int = 8
    >>> validate_extra(Settings, {"max_entries": 2})
    Settings(max_entries=2)
    >>> try:
    ...     validate_extra(Settings, {"max_entrie": 2})
    ... except ConfigError as exc:
    ...     print(exc.problems[0].path, "->", exc.problems[0].suggestion())
    connector.extra.max_entrie -> max_entries
    """
    if model is None:
        return dict(extra or {})
    data = extra or {}
    problems = _unknown_keys(model, data)
    try:
        value = model.model_validate(data)
    except ValidationError as exc:
        problems += problems_from_validation_error(exc, model, extra, prefix="connector.extra")
    if problems:
        raise ConfigError(problems) from None
    return value


def _unknown_keys(model: type[BaseModel], data: Any) -> list[Problem]:
    """``connector.extra.KEY`` problems for keys a model that ignores unknown keys would drop."""
    if not isinstance(data, dict) or model.model_config.get("extra") in ("forbid", "allow"):
        return []
    known = set(model.model_fields)
    known |= {f.alias for f in model.model_fields.values() if isinstance(f.alias, str)}
    known |= {f.validation_alias for f in model.model_fields.values() if isinstance(f.validation_alias, str)}
    return [Problem(f"connector.extra.{k}", f"unknown key {short(k, 80)}", value=v, allowed=sorted(model.model_fields),
                    typo=k, fix="remove it or correct its spelling")
            for k, v in data.items() if str(k) not in known]
