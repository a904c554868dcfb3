"""kvconf's built-in connectors, imported as ``kvconf_connectors`` (a name that cannot collide in
site-packages: PyPI already has a package called ``connectors``).

Each module declares one connector class on :class:`kvconf.KVConnectorBase` and the pydantic model
of its ``extra`` settings. Importing this package imports no connector; kvconf's registry imports
the one a config names.
"""
