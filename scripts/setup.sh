#!/usr/bin/env bash
# Creates .venv with everything orchestrator needs. Torch goes first so that no CUDA build is pulled
# on a machine without a GPU (a plain `torch` requirement would fetch the newest, CUDA-enabled wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

quiet_pip() {  # pip's warnings about missing local mirrors are noise, not errors
  local log status=0
  log=$(mktemp)
  "$VENV/bin/pip" install --disable-pip-version-check -q "$@" >"$log" 2>&1 || status=$?
  grep -v "is ignored: it is neither" "$log" || true
  rm -f "$log"
  return "$status"
}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # Here pip's find-links holds the CPU wheel of this version; elsewhere set TORCH_VERSION or
  # install the torch build you want first (this step is skipped when torch imports).
  quiet_pip "torch==$TORCH_VERSION"
fi
quiet_pip -e ".[test]"
"$VENV/bin/python" -c "import torch, ray, deepspeed, peft, orchestrator; print('setup ok: torch', torch.__version__, '| ray', ray.__version__, '| deepspeed', deepspeed.__version__, '| peft', peft.__version__)"
touch "$VENV/.installed"
