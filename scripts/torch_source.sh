# Where the CPU build of torch comes from; sourced by install_torch.sh and install_vllm.sh.
#
# Needs PIP (the pip command of the target venv, as an array). Sets:
#   TORCH_SPEC    the torch requirement: torch==2.13.0+cpu (torch==2.13.0 on macOS, whose
#                 default build has no CUDA);
#   TORCH_SOURCE  extra pip arguments for every install that may resolve torch:
#                 - none, when a wheel folder pip is configured with (find-links) holds that
#                   wheel: it is used, and no other index is asked (an unreachable one costs
#                   pip ~8 s per package looked up);
#                 - otherwise --extra-index-url $TORCH_INDEX_URL (PyTorch's CPU index,
#                   https://download.pytorch.org/whl/cpu unless set), the only index that has
#                   the +cpu build: PyPI's torch for Linux is the CUDA build with ~3 GB of
#                   nvidia-* wheels.
# EXPO_RAY_PIP_REPORT_DIR=DIR turns every pip install of these scripts into
# `pip install --dry-run --report DIR/<step>.json` (what tests/test_install.py checks).
TORCH_VERSION="2.13.0"
if [[ "$(uname -s)" == "Darwin" ]]; then
  TORCH_SPEC="torch==$TORCH_VERSION"
else
  TORCH_SPEC="torch==$TORCH_VERSION+cpu"
fi
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"

pip_install() {  # pip_install STEP ARGS...: pip install, or its dry run with a report
  local step="$1"; shift
  if [[ -n "${EXPO_RAY_PIP_REPORT_DIR:-}" ]]; then
    "${PIP[@]}" install --dry-run --report "$EXPO_RAY_PIP_REPORT_DIR/$step.json" "$@"
  else
    "${PIP[@]}" install "$@"
  fi
}

if "${PIP[@]}" install -q --dry-run --no-index --no-deps "$TORCH_SPEC" >/dev/null 2>&1; then
  TORCH_SOURCE=()
else
  TORCH_SOURCE=(--extra-index-url "$TORCH_INDEX_URL")
fi
