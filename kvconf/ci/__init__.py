"""The CI layer: checks for pipelines and pre-commit hooks, none of which imports torch, touches a
GPU or allocates.

================  ===================================================================================
module            what it holds
================  ===================================================================================
validate          ``kvconf validate``: config files and the matrix of group options, with file:line:col
check_connector   ``kvconf check-connector``: the constructor contract of connector classes
conformance       the conformance tests a connector class must pass
pytest_plugin     ``pytest --kvconf-connector MODULE:CLASS``: those tests as a pytest plugin
schemas           ``python -m kvconf.ci.schemas``: writes the JSON Schemas, or ``--check`` they are current
================  ===================================================================================
"""
