"""Connector classes for tests: one per contract case. Imported by module path, as users would."""
