"""A stand-in for vLLM, for tests on machines without it."""
