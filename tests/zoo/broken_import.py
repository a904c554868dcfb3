raise RuntimeError("this connector module is broken on purpose")
