#!/usr/bin/env bash
# Installs what the tests need (scripts/bootstrap.sh), checks the code with ruff and runs the
# whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
# The code style the project keeps (pyproject.toml [tool.ruff]): checked first, it takes a second.
if ! .venv/bin/ruff check --quiet .; then
  echo "error: ruff found problems (listed above); fix them, or run .venv/bin/ruff check --fix ." >&2
  exit 1
fi
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit $rc
