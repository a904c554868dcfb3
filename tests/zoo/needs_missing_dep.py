import kvconf_no_such_dependency  # noqa: F401
