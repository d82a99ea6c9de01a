#!/usr/bin/env bash
# Set up the environment from nothing (idempotent) and run the default test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --quiet .
# Two pytest-xdist workers (the project's machine has 2 cores): 98 s instead of 178 s serial for the same 237 tests, quiet.
# No test depends on the order or the worker it runs on; each worker builds its own fixtures.
.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 "$@"
