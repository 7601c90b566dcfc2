#!/usr/bin/env bash
# GPU smoke on one GPU: a few RL steps (deploy/configs/gpu_smoke.yaml, HF engine, no vLLM), the
# learner's tokens/s and MFU at Qwen2.5-0.5B/1.5B shapes, and a weight sync; one JSON line each on
# stdout (scripts/gpu_smoke.py says what each holds). Needs torch (a CUDA build), transformers and
# the project's other dependencies (`pip install -e .`), no network. Bounded: killed after 8 minutes.
#   bash scripts/gpu_smoke.sh [--peak-tflops N] [--shapes qwen2.5-0.5b] ... | tee gpu_smoke.jsonl
#   bash scripts/gpu_smoke.sh --cpu-check      # tiny shapes on CPU, no GPU needed (tests/test_gpu_smoke.py)
# PYTHON picks the interpreter (default: .venv/bin/python when present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
missing=$("$PY" - <<'PYCHECK'
import importlib.util
print(" ".join(m for m in ("torch", "transformers", "ray", "fastapi", "safetensors") if importlib.util.find_spec(m) is None))
PYCHECK
)
if [ -n "$missing" ]; then
  echo "gpu_smoke.sh: $PY lacks $missing: install torch (the CUDA build) first, then the project (pip install -e .)" >&2
  exit 2
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec timeout --signal=TERM --kill-after=20 480 "$PY" scripts/gpu_smoke.py "$@"
