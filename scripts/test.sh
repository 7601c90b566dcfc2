#!/usr/bin/env bash
# Set up and run every test, in the one environment (.venv, vLLM on CPU included). This is the
# README's test command and exactly what CI (.ci/run) runs. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --test || exit 1
exec .venv/bin/python -m pytest -q "$@"
