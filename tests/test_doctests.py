"""The docstring examples of the built-in connectors (``connectors/``) and of the config tree's
module (``conf/``) run under their import names, ``kvconf_connectors`` and ``kvconf.conf``: pytest's
``--doctest-modules`` would import those folders under their folder names, a second copy of each
module. (kvconf/'s own examples run through ``--doctest-modules``.)"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import kvconf.conf
import kvconf_connectors


def _modules() -> list[str]:
    names = ["kvconf.conf", "kvconf_connectors"]
    names += [m.name for m in pkgutil.walk_packages(kvconf_connectors.__path__, "kvconf_connectors.")]
    return sorted(names)


def test_every_connector_module_is_collected():
    assert {"kvconf_connectors.offloading", "kvconf_connectors.p2p.protocol", "kvconf_connectors.p2p.auth"} <= set(
        _modules())


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"


def test_a_failing_example_is_reported():
    bad = type(kvconf.conf)("planted", '>>> 1 + 1\n3\n')
    assert doctest.testmod(bad, report=False).failed == 1
