#!/usr/bin/env bash
# Installs what the tests need (scripts/bootstrap.sh), checks the code with ruff and runs the
# test suite; arguments go to pytest (e.g. `scripts/test.sh -k plan -x`).
#
#   scripts/test.sh            the whole suite, as CI runs it
#   scripts/test.sh --fast     everything not marked slow (no vLLM engine, S3 server, multi-node or
#                              autoscaling cluster, `ray start` head or demo training): a few minutes
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
# The code style the project keeps (pyproject.toml [tool.ruff]): checked first, it takes a second.
if ! .venv/bin/ruff check --quiet .; then
  echo "error: ruff found problems (listed above); fix them, or run .venv/bin/ruff check --fix ." >&2
  exit 1
fi
args=()
for a in "$@"; do
  if [[ "$a" == "--fast" ]]; then args+=(-m "not slow"); else args+=("$a"); fi
done
began=$SECONDS
set +e
.venv/bin/python -m pytest ${args[@]+"${args[@]}"}
rc=$?
set -e
echo "tests: pytest exited with $rc after $((SECONDS - began)) s"
if [[ $rc -eq 5 ]]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit $rc
