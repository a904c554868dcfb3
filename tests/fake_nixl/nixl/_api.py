raise ImportError("libucp.so.0: cannot open shared object file")
