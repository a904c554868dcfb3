"""The CI layer: checks for pipelines and pre-commit hooks, none of which imports torch, touches a
GPU or allocates.

================  ===================================================================================
module            what it holds
================  ===================================================================================
validate          ``kvconf validate``: config files and the matrix of group options, with file:line:col
check_connector   ``kvconf check-connector``: the constructor contract of connector classes
lint              ``kvconf lint``: vLLM ``--kv-transfer-config`` values checked against the catalogue
catalogue         the misconfigurations vLLM users hit, as data (detector, message, fix, source)
sources           where ``--kv-transfer-config`` values are in a file, parsed with each key's line
translate         vLLM's KVTransferConfig in kvconf's terms (names, extra keys, model checks)
importer          ``kvconf import``: a vLLM ``--kv-transfer-config`` as ``connector/NAME.yaml``
usage             the CI commands' argument parser (a usage error exits 2)
annotations       GitHub workflow commands (``--format github``), escaped in one place
conformance       the conformance tests a connector class must pass
pytest_plugin     ``pytest --kvconf-connector MODULE:CLASS``: those tests as a pytest plugin
schemas           ``python -m kvconf.ci.schemas``: writes the JSON Schemas, or ``--check`` they are current
================  ===================================================================================
"""
