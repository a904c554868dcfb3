"""kvconf: declare, validate and start KV-cache connectors.

The public API is flat and cheap to import: no torch, no connector, no Hydra app. The package is
laid out by layer, each importing only the layers before it::

    errors, units, version      leaves every layer uses
    conf/                       the Hydra config tree (CONF_DIR, GROUPS)
    config/                     validate: pydantic models, KV-cache layouts, diagnostics, JSON Schemas
    contract/                   the connector API, its optional capabilities, the registry, the check
    runtime/                    plan, allocate, the pipeline, the self-test engine, export
    bench/                      action=bench, raw paths, results.json, sweep summaries, compare
    ci/                         kvconf validate, check-connector, the conformance kit and plugin
    cli/                        the Hydra app and the kvconf command
"""

from kvconf.config.kvcache import KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
from kvconf.config.layout import KVCacheLayout
from kvconf.config.models import ConnectorConfig, KVConfConfig
from kvconf.contract.api import KVCacheBlocks, KVConnectorMetadata, KVConnectorRole, Request, SchedulerOutput
from kvconf.contract.base import KVConnectorBase
from kvconf.contract.capabilities import (
    ChecksConfig,
    ChecksEnvironment,
    ComparesToBaseline,
    ExplainsFailures,
    ExportsToVLLM,
    ReportsListeners,
    SelfTestContext,
    SupportsHMA,
    SupportsRawPath,
    SupportsSelfTest,
    SupportsServe,
)
from kvconf.errors import ConfigError, ConnectorRuntimeError, ContractError, KVConfError, Problem
from kvconf.version import __version__

__all__ = [
    "ChecksConfig",
    "ChecksEnvironment",
    "ComparesToBaseline",
    "ConfigError",
    "ConnectorConfig",
    "ConnectorRuntimeError",
    "ContractError",
    "ExplainsFailures",
    "ExportsToVLLM",
    "KVCacheBlocks",
    "KVCacheConfig",
    "KVCacheGroupSpec",
    "KVCacheLayout",
    "KVCacheTensor",
    "KVConfConfig",
    "KVConfError",
    "KVConnectorBase",
    "KVConnectorMetadata",
    "KVConnectorRole",
    "Problem",
    "ReportsListeners",
    "Request",
    "SchedulerOutput",
    "SelfTestContext",
    "SupportsHMA",
    "SupportsRawPath",
    "SupportsSelfTest",
    "SupportsServe",
    "__version__",
]
