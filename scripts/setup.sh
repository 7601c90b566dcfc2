#!/usr/bin/env bash
# Set up this checkout on a fresh machine: a virtualenv in .venv with CPU torch and the project.
#   bash scripts/setup.sh          # what the main job needs
#   bash scripts/setup.sh --test   # plus the test extras and the system services the tests start
#                                  # (redis-server, prometheus; installed with apt-get when missing)
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    *) echo "setup.sh: unknown argument '$arg' (known: --test)" >&2; exit 2 ;;
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

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup.sh: creating .venv"
  "$PY" -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" torch==2.13.0
if [ "$want_test" = 1 ]; then
  "${pip[@]}" -e '.[test]'
else
  "${pip[@]}" -e .
fi
echo "setup.sh: ready (.venv, torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
