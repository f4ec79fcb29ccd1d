#!/usr/bin/env bash
# Runs the test suite headless; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export QT_QPA_PLATFORM=offscreen
export PYTHONDONTWRITEBYTECODE=1
exec .venv/bin/python -m pytest -q "$@"
