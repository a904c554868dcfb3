"""What the real-vLLM tests share: a tiny random model made on the spot (no hub), and one vLLM
run in a process of its own (:mod:`vllm_runner`), forked from a process that has imported vLLM
(:mod:`vllm_zygote`: the import is two thirds of a small run; ``KVCONF_TEST_ZYGOTE=0`` starts each
run from nothing instead)."""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from conftest import OWNER, TESTS, kvconf_env
from kvconf.runtime.forkserver import ForkClient

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (bash scripts/setup.sh installs it)")

BLOCK = 32
"""vLLM's block size in these tests (the CPU attention backend takes multiples of 32)."""

MODEL_SCRIPT = textwrap.dedent('''
    import sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    out = sys.argv[1]
    torch.manual_seed(0)
    # initializer_range 0.2: varied greedy tokens (0.02 repeats one token), which a tokens-identical check needs
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=64, vocab_size=512, initializer_range=0.2,
                      max_position_embeddings=2048, torch_dtype="float32")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(out)
''')


def build_model(folder: Path) -> Path:
    """A random two-layer Llama (hidden 128, 2 KV heads of 64, vocab 512) and a byte-level BPE
    tokenizer in ``folder``, seeded: the same bytes every time. Built beside and renamed into
    place, so that test workers building the same folder at once end with one whole model."""
    if not (folder / "config.json").is_file():
        part = folder.with_name(f"{folder.name}.part-{os.getpid()}")
        proc = subprocess.run([sys.executable, "-c", MODEL_SCRIPT, str(part)], capture_output=True, text=True,
                              env=kvconf_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        try:
            part.rename(folder)
        except OSError:  # another worker's is there: the same bytes
            shutil.rmtree(part, ignore_errors=True)
    assert (folder / "config.json").is_file()
    return folder


def shared_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`build_model` once per test run, for every module and worker (the run's temporary
    folder, which pytest-xdist's workers share)."""
    base = tmp_path_factory.getbasetemp()
    return build_model((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny-llama-shared")


def prompt(seed: int, n: int) -> list[int]:
    """``n`` token ids (2..501), different for each ``seed``."""
    return [(seed * 7919 + j * 31 + (j * j) % 13) % 500 + 2 for j in range(n)]


class Run:
    """One vLLM process's outcome: ``batches`` (per batch, per prompt: ``tokens``, ``cached``,
    ``finish``), its exit code, its log (what it printed) and, where vLLM did not start, ``error``."""

    def __init__(self, proc: subprocess.CompletedProcess) -> None:
        self.code = proc.returncode
        self.log = proc.stdout + proc.stderr  # vLLM logs to stdout
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        data: dict[str, Any] = json.loads(lines[-1]) if lines else {}
        self.batches: list[list[dict[str, Any]]] = data.get("batches", [])
        self.error: str | None = data.get("error")

    def tokens(self, batch: int = 0) -> list[list[int]]:
        return [r["tokens"] for r in self.batches[batch]]

    def cached(self, batch: int = 0) -> list[int]:
        return [r["cached"] for r in self.batches[batch]]

    def __repr__(self) -> str:
        return f"Run(code={self.code}, error={self.error!r}, log=...{self.log[-3000:]})"


def run_vllm(spec_dir: Path, model: Path, batches: list[list[list[int]]], kv_transfer_config: Any = None,
             timeout: float = 300, env: dict[str, str] | None = None, multiprocess: bool = False,
             **options: Any) -> Run:
    """Runs :mod:`vllm_runner` in a process of its own, with a fresh engine (``multiprocess``:
    in vLLM's default layout of three processes)."""
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = spec_dir / f"spec-{len(list(spec_dir.glob('spec-*.json')))}.json"
    spec.write_text(json.dumps({"model": str(model), "batches": batches,
                                "kv_transfer_config": kv_transfer_config, **options}))
    argv = [str(TESTS / "vllm_runner.py"), str(spec), *(["--multiprocess"] if multiprocess else [])]
    run_env = kvconf_env(**(env or {}))
    if os.environ.get("KVCONF_TEST_ZYGOTE", "1") == "0":
        return Run(subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=run_env,
                                  timeout=timeout, cwd=spec_dir))
    out, err = spec.with_suffix(".stdout"), spec.with_suffix(".stderr")
    code = _Zygote.get().run({"argv": argv, "env": run_env, "cwd": str(spec_dir), "stdout": str(out),
                              "stderr": str(err)}, timeout)
    return Run(subprocess.CompletedProcess([sys.executable, *argv], code, out.read_text(), err.read_text()))


class _Zygote:
    """One of this test worker's :mod:`vllm_zygote` processes: started when a run finds none
    idle (two sides of a prefill/decode test at once: two of them), stopped when the worker
    ends (and with it, were the worker killed). Not marked as any test's process: it outlives
    them; each run it forks is waited for, and stopped with what it started past its timeout."""

    _all: list[_Zygote] = []

    def __init__(self) -> None:
        env = kvconf_env()
        env.pop(OWNER, None)
        self.client = ForkClient([sys.executable, str(TESTS / "vllm_zygote.py")], env=env, cwd=str(TESTS))
        self.busy = False
        atexit.register(self.stop)

    @classmethod
    def get(cls) -> _Zygote:
        """An idle zygote (a new one where every one is busy or gone), now busy."""
        cls._all = [z for z in cls._all if z.client.alive()]
        one = next((z for z in cls._all if not z.busy), None)
        if one is None:
            one = cls()
            cls._all.append(one)
        one.busy = True
        return one

    def start(self, request: dict[str, Any]) -> int:
        """Forks one run; its pid."""
        pid = self.client.start(request, 120)
        if pid is None:
            self.busy = False
            raise RuntimeError(f"the vLLM zygote did not fork the run (exit code {self.client.proc.poll()})")
        return pid

    def end(self, timeout: float) -> int | None:
        """The run's exit code once it ended (the zygote idle again), None while it runs."""
        code = self.client.end(timeout)
        if code is not None:
            self.busy = False
        return code

    def run(self, request: dict[str, Any], timeout: float) -> int:
        """The exit code of one run; :class:`subprocess.TimeoutExpired` past ``timeout`` (its
        process group killed)."""
        child = Forked(self, self.start(request))
        try:
            return child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(60)
            raise subprocess.TimeoutExpired(request["argv"], timeout) from None

    def stop(self) -> None:
        if self.client.alive():
            self.client.proc.kill()
            self.client.proc.wait()


class Forked:
    """A run forked by a :class:`_Zygote`, as :class:`subprocess.Popen` is used by the tests:
    ``poll``, ``wait``, ``kill``, ``returncode``."""

    def __init__(self, zygote: _Zygote, pid: int) -> None:
        self.zygote, self.pid = zygote, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote.end(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self.zygote.end(1e9 if timeout is None else timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
        return self.returncode

    def kill(self) -> None:
        ForkClient.kill(self.pid)  # the run and what it started


def start_script(module: str, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> Any:
    """``python TESTS/MODULE.py ARGV...`` started with its output (both streams) in ``log``: forked
    from a zygote (a :class:`Forked`), or a process of its own where ``KVCONF_TEST_ZYGOTE=0``."""
    path = str(TESTS / f"{module}.py")
    if os.environ.get("KVCONF_TEST_ZYGOTE", "1") == "0":
        with open(log, "w") as out:
            return subprocess.Popen([sys.executable, path, *argv], stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                    env=env)
    zygote = _Zygote.get()
    return Forked(zygote, zygote.start({"module": module, "argv": [path, *argv], "env": env, "cwd": str(cwd),
                                        "stdout": str(log), "stderr": str(log)}))


def export(*overrides: str, cwd: Path) -> dict[str, Any]:
    """``python -m kvconf ... action=export export.target=kvconf``'s JSON."""
    proc = subprocess.run([sys.executable, "-m", "kvconf", *overrides, "action=export", "export.target=kvconf"],
                          capture_output=True, text=True, env=kvconf_env(), cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def altered(p: list[int]) -> list[int]:
    """``p`` with tokens 30..49 changed: same length, same last token. Sent to a decode with the
    params of ``p``, it continues ``p`` where the KV cache was read, itself where nothing was."""
    return p[:30] + [(t + 101) % 500 + 2 for t in p[30:50]] + p[50:]


PD_PROMPTS = [prompt(1, 40), prompt(2, 100), prompt(3, 64), prompt(4, 96), prompt(5, 70)]
"""What the prefill/decode tests prefill: a partial block, several blocks, exact blocks."""
PD_EVERY = PD_PROMPTS + [altered(p) for p in PD_PROMPTS]


def shared_reference(tmp_path_factory: pytest.TempPathFactory, model: Path,
                     prompts: list[list[int]]) -> dict[tuple[int, ...], list[int]]:
    """Each prompt's greedy tokens from vLLM with no connector (one batch, no prefix caching),
    once per test run for the same prompts (kept beside :func:`shared_model`'s)."""
    import hashlib

    base = tmp_path_factory.getbasetemp()
    base = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]
    cached = base / f"reference-{digest}.json"
    if not cached.is_file():
        run = run_vllm(tmp_path_factory.mktemp("reference"), model, [prompts], enable_prefix_caching=False)
        assert run.code == 0, run
        part = cached.with_name(f"{cached.name}.part-{os.getpid()}")
        part.write_text(json.dumps(run.tokens()))
        part.replace(cached)
    tokens = json.loads(cached.read_text())
    return {tuple(p): t for p, t in zip(prompts, tokens)}
