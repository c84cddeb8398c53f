#!/usr/bin/env bash
# Set up .venv with xorweights and its test tools. Safe to run again.
# torch: first try the CPU build that lies on this machine's disk (torch==2.13.0),
# so that torch>=2.1 never pulls a multi-GB CUDA build when it does not have to.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "torch==2.13.0" 2>/dev/null || echo "setup: no local torch 2.13.0 CPU build; pip will choose torch>=2.1"
fi
"${PIP[@]}" install -e ".[dev]" 2> >(grep -v "is ignored: it is neither" >&2)
.venv/bin/python -c "import xorweights, torch; print('xorweights', xorweights.__version__, 'ready, torch', torch.__version__)"
