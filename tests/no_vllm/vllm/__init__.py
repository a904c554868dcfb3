"""vLLM as a machine without it sees it: put this folder first on PYTHONPATH and ``import vllm``
fails as it does where vLLM is not installed (the set-up installs the real one)."""

raise ModuleNotFoundError("No module named 'vllm'", name="vllm")
