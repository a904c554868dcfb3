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


def pytest_addoption(parser) -> None:
    group = parser.getgroup("kvconf", "kvconf connector conformance")
    group.addoption("--kvconf-connector", action="append", default=[], metavar="MODULE:CLASS",
                    help="run kvconf's conformance tests against this connector class (repeatable)")
    group.addoption("--kvconf-override", action="append", default=[], metavar="KEY=VALUE",
                    help="a Hydra override for the config the connector is built with, e.g. "
                         "connector.extra.capacity=1GiB or kv_cache=llama3_8b (repeatable)")


def pytest_configure(config) -> None:
    if config.getoption("--kvconf-connector"):
        from kvconf.ci import conformance

        config.args.append(str(Path(conformance.__file__)))


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
