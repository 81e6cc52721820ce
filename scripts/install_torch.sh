#!/usr/bin/env bash
# Installs the CPU build of torch into a virtual environment, before anything that depends on it,
# so that no dependency pulls PyPI's CUDA build (multi-GB, with nvidia-* wheels).
#
#   scripts/install_torch.sh [VENV]        (default: .venv; must exist)
#
# The wheel comes from a wheel folder pip is configured with, when it has it, else from PyTorch's
# CPU index (TORCH_INDEX_URL, default https://download.pytorch.org/whl/cpu): ~190 MB download,
# ~800 MB installed, plus small pure-Python dependencies (sympy, networkx, jinja2, ...).
set -euo pipefail
VENV="${1:-.venv}"
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)
source "$(dirname "$0")/torch_source.sh"

installed="$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)"
if [[ "$TORCH_SPEC" == "torch==$installed" ]]; then
  echo "install_torch: torch $installed already installed"
  exit 0
fi
echo "install_torch: installing $TORCH_SPEC (found: ${installed:-none}) from ${TORCH_SOURCE[*]:-the configured wheel folder}"
pip_install torch "${TORCH_SOURCE[@]}" "$TORCH_SPEC"
