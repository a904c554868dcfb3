"""Stands in for a Mooncake install whose engine cannot load (missing libibverbs, wrong build)."""
