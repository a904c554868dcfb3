"""kvconf's conformance kit, as a pytest plugin (registered through the ``pytest11`` entry point).

    pytest --kvconf-connector my_pkg.my_module:MyConnector [--kvconf-connector ...]
           [--kvconf-override connector.extra.key=value ...]

adds kvconf's conformance tests (:mod:`kvconf.ci.conformance`) to the run, once per class: the
constructor contract; the scheduler side allocates nothing; the worker side accepts registered
caches; save then load through kvconf's driver returns the same bytes; shutdown releases
everything. Without ``--kvconf-connector`` the plugin does nothing.
"""

from __future__ import annotations

from pathlib import Path

from _pytest.stash import StashKey

_SETTINGS: StashKey[list[str]] = StashKey()


def pytest_addoption(parser) -> None:
    group = parser.getgroup("kvconf", "kvconf connector conformance")
    group.addoption("--kvconf-connector", action="append", default=[], metavar="MODULE:CLASS",
                    help="run kvconf's conformance tests against this connector class (repeatable)")
    group.addoption("--kvconf-override", action="append", default=[], metavar="KEY=VALUE",
                    help="a Hydra override for the config the connector is built with, e.g. "
                         "connector.extra.capacity=1GiB or kv_cache=llama3_8b (repeatable)")


def pytest_configure(config) -> None:
    targets = config.getoption("--kvconf-connector")
    if not targets:
        return
    import pytest

    from kvconf.ci import conformance
    from kvconf.errors import KVConfError

    settings = []
    for target in targets:
        try:
            settings.append(f"kvconf: {target}: connector.extra: {conformance.settings_of(target, overrides(config))}")
        except KVConfError as exc:  # a misspelt key, a bad value: kvconf's message; no test runs
            pytest.exit(f"{target}:\n{exc}", returncode=2)
        except (ImportError, AttributeError) as exc:
            pytest.exit(f"{target}: cannot load the class: {exc}; fix: give MODULE:CLASS of an importable module",
                        returncode=2)
    config.stash[_SETTINGS] = settings
    config.args.append(str(Path(conformance.__file__)))


def overrides(config) -> list[str]:
    """The ``--kvconf-override`` values, in order."""
    return list(config.getoption("--kvconf-override"))


def pytest_report_header(config) -> list[str]:
    """Each connector under test and the validated settings it is built with."""
    return list(config.stash.get(_SETTINGS, []))


def pytest_generate_tests(metafunc) -> None:
    if "kvconf_target" in metafunc.fixturenames:
        targets = metafunc.config.getoption("--kvconf-connector")
        metafunc.parametrize("kvconf_target", targets, ids=targets)


_exit_status = 0


def pytest_sessionfinish(session, exitstatus) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config) -> None:
    """After the last report: where a connector's engine would crash the interpreter's exit (NIXL),
    end with pytest's own exit status instead."""
    from kvconf.runtime.process import hard_exit

    hard_exit(_exit_status)
