#!/usr/bin/env bash
# Create .venv (Python 3.12, which LeRobot 0.6.1 requires) and install the project with the simulator and hardware extras.
set -euo pipefail
cd "$(dirname "$0")/.."

is_py312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }

if [ -z "${PYTHON:-}" ]; then
  for candidate in "$(command -v python3.12 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && is_py312 "$candidate"; then PYTHON="$candidate"; break; fi
  done
fi
if [ -z "${PYTHON:-}" ]; then
  echo "Python 3.12 not found: install it (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[pusht,robomimic,maniskill,hardware,dev]"
# The LeRobot policy plugin (a `step` policy type for lerobot-eval / lerobot-rollout), a local distribution of its own.
.venv/bin/python -m pip install -q -e plugins/lerobot_policy_step
# ManiSkill (SAPIEN) needs a Vulkan device: Mesa 25 lavapipe into .vendor/lavapipe (idempotent, ~11 MB).
bash scripts/fetch_lavapipe.sh || echo "warning: no lavapipe fetched; step/StackCube-v0 needs a Vulkan driver (see scripts/fetch_lavapipe.sh)" >&2
echo "environment ready: source .venv/bin/activate"
