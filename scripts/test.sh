#!/usr/bin/env bash
# Set up the environment from nothing (idempotent) and run the default test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --quiet .
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
