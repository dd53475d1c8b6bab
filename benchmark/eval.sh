#!/usr/bin/env bash
# Zero-shot step 3 of 3: aggregate prediction folders into a Markdown and JSON table.
set -euo pipefail
usage() {
  cat <<USAGE
usage: benchmark/eval.sh [--out PATH] [--overwrite] PRED_DIR [PRED_DIR ...]

Reads predictions.jsonl from each folder written by step 2 (benchmark/run.sh), or results.json
from a run saved by main.py --save with --eval_zero_shot, and writes PATH.md and PATH.json (default
\$ZS_TABLE or zero_shot): acc and acc_norm per task, and the means, one row per folder; each row
after the first also gets its paired difference of mean acc against the first (same items).
USAGE
}
OUT="${ZS_TABLE:-zero_shot}"; EXTRA=(); DIRS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) OUT="$2"; shift 2 ;;
    --overwrite) EXTRA+=(--overwrite); shift ;;
    -*) echo "eval.sh: error: unknown option '$1' (see --help)" >&2; exit 2 ;;
    *) DIRS+=("$1"); shift ;;
  esac
done
[ ${#DIRS[@]} -gt 0 ] || { echo "eval.sh: error: give at least one prediction folder (see --help)" >&2; exit 2; }
for d in "${DIRS[@]}"; do
  if [ ! -f "$d/predictions.jsonl" ] && [ ! -f "$d/results.json" ]; then
    echo "eval.sh: error: no predictions in $d: run benchmark/run.sh --model CKPT --out $d first" >&2; exit 2
  fi
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
exec "$PY" -m mosaic.eval.zs_steps aggregate --out "$OUT" "${EXTRA[@]}" "${DIRS[@]}"
