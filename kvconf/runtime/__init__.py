"""The runtime layer: from a validated config to a running connector.

==========  ====================================================================================
module      what it holds
==========  ====================================================================================
pipeline    the stages in order (validate, resolve, contract, plan, construct, allocate, act)
plan        bytes per tensor and in total, checked against what the device has free (no torch)
allocate    the plan's tensors on the device, one named view per layer (the first torch import)
views       each layer's blocks as rows of raw bytes
engine      a small engine that drives a connector as vLLM does, for self-tests and benchmarks
pattern     the deterministic byte pattern that lets a receiver verify a block
export      ``action=export``: vLLM's ``--kv-transfer-config``
process     how kvconf's processes end where an engine would crash a normal exit (NIXL)
==========  ====================================================================================
"""
