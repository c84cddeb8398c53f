#!/usr/bin/env bash
# Set up .venv with xorweights and its test tools. Safe to run again.
# torch is only the [torch] extra of xorweights, but the tests need it ([dev]
# pulls in [test], which pulls in [torch]). First try the CPU build that lies on
# this machine's disk (torch==2.13.0), so that torch>=2.1 never pulls a
# multi-GB CUDA build when it does not have to.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "torch==2.13.0" 2>/dev/null || echo "setup: no local torch 2.13.0 CPU build; pip will choose torch>=2.1"
fi
# The compat suite runs transformers against rebuilt models; the constraint keeps the torch above.
"${PIP[@]}" install -e ".[dev,compat]" -c <(.venv/bin/python -c 'import torch; print("torch==" + torch.__version__)' 2>/dev/null) 2> >(grep -v "is ignored: it is neither" >&2)
.venv/bin/python -c "import xorweights, torch; print('xorweights', xorweights.__version__, 'ready, torch', torch.__version__)"
