#!/usr/bin/env bash
# Zero-shot step 2 of 3: per-sample predictions of one checkpoint (dense, unstructured or composite).
set -euo pipefail
usage() {
  cat <<USAGE
usage: benchmark/run.sh --model CKPT --out DIR [--data DIR] [--tasks LIST] [--limit N] [--batch_size B] [--dtype D] [--overwrite]

  --model       checkpoint saved with main.py --save_model (or smollm2-135m for the dense model, or a hub id)
  --out         folder for predictions.jsonl and lm_eval.json
  --data        folder made by step 1, scripts/data_generation/run.sh (default \$ZS_DATA or llm_weights/zero_shot)
  --tasks       comma list or all (default: boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa)
  --limit       at most N items per task (default \$ZS_LIMIT or all)
  --batch_size  lm-eval batch size (default \$ZS_BATCH_SIZE or 16)
  --dtype       float32 (default, \$ZS_DTYPE) or bfloat16 (about twice as fast on CPUs with native bf16)
Next: benchmark/eval.sh DIR ...
USAGE
}
MODEL="${MODEL:-}"; OUT="${PRED_OUT:-}"; DATA="${ZS_DATA:-llm_weights/zero_shot}"; TASKS="${ZS_TASKS:-all}"
LIMIT="${ZS_LIMIT:-}"; BATCH="${ZS_BATCH_SIZE:-16}"; DTYPE="${ZS_DTYPE:-float32}"; EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --model) MODEL="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --tasks) TASKS="$2"; shift 2 ;;
    --limit) LIMIT="$2"; shift 2 ;;
    --batch_size) BATCH="$2"; shift 2 ;;
    --dtype) DTYPE="$2"; shift 2 ;;
    --overwrite) EXTRA+=(--overwrite); shift ;;
    *) echo "run.sh: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$MODEL" ] || { echo "run.sh: error: --model is required (see --help)" >&2; exit 2; }
[ -n "$OUT" ] || { echo "run.sh: error: --out is required (see --help)" >&2; exit 2; }
if [ ! -f "$DATA/manifest.json" ]; then
  echo "run.sh: error: no zero-shot data in $DATA: run scripts/data_generation/run.sh --out $DATA first" >&2; exit 2
fi
[ -n "$LIMIT" ] && EXTRA+=(--limit "$LIMIT")
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
exec "$PY" -m mosaic.eval.zs_steps predict --model "$MODEL" --out "$OUT" --data "$DATA" --tasks "$TASKS" \
  --batch_size "$BATCH" --dtype "$DTYPE" "${EXTRA[@]}"
