"""Stands in for a NIXL install that does not load."""
