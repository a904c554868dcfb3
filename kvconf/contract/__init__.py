"""The contract layer: what a connector is and how kvconf finds one and proves it can be built.

=============  =================================================================================
module         what it holds
=============  =================================================================================
api            vLLM's connector API types: roles, requests, block ids, scheduler output
base           ``KVConnectorBase``: vLLM's v1 connector API with the three-argument constructor
capabilities   kvconf's optional capabilities, one mixin each (self-test, serve, export, ...)
registry       connector names to classes: built-in names, entry points, ``module_path``
signature      the constructor contract: ``cls(config, role, kv_cache_config)``, checked without
               calling ``cls``; a class must subclass kvconf's base or vLLM's ``KVConnectorBase_V1``
static         connectors written for vLLM, read from source where vLLM is not installed
=============  =================================================================================

Importing this package imports no connector and no torch. It also keeps the names of the old
``kvconf.contract`` module (``check``, ``require``, ``Verdict``, ...) for one release.
"""

from .signature import FIX, Verdict, check, check_received, require, vllm_accepts

__all__ = ["FIX", "Verdict", "check", "check_received", "require", "vllm_accepts"]
