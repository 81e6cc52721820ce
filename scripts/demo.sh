#!/usr/bin/env bash
# Installs expo-ray (scripts/bootstrap.sh) and runs `expo-ray demo` on tiny built-in models.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/expo-ray demo "$@"
