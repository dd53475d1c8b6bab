#!/usr/bin/env bash
# The distributed checks on a machine with 2 or more GPUs (never run here: no GPU was lent yet).
#   bash scripts/gpu_distributed_check.sh [N]     # N GPUs (default: all), results under $OUT (default /tmp)
# 1. SparseGPT 50% and ALPS 70% on SmolLM2-135M: 1 GPU against N ranks (torchrun, NCCL): perplexity, time,
#    zero-pattern and weight differences (on GPUs reductions are not bit-deterministic: expect small diffs).
# 2. FSDP2 distillation (20 steps) on 1 GPU against N ranks: held-out KL before/after, zeros kept.
# 3. A rank that hangs must end the run within --dist_timeout 30 (+ torchrun's own shutdown).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
N=${1:-$("$PY" -c 'import torch; print(torch.cuda.device_count())')}
OUT=${OUT:-/tmp}/mosaic-gpu-distributed
[ "$N" -ge 2 ] || { echo "needs 2 or more GPUs, found $N" >&2; exit 2; }
mkdir -p "$OUT"
COMMON=(--nsamples 32 --seqlen 512 --eval_windows 16 --seed 0 --overwrite)
run() {  # run NAME RANKS ARGS...: one job, timed, its results in $OUT/NAME
  local name=$1 ranks=$2; shift 2
  local start=$SECONDS
  if [ "$ranks" -eq 1 ]; then "$PY" main.py "$@" "${COMMON[@]}" --save "$OUT/$name" --save_model "$OUT/$name-m"
  else "$PY" -m torch.distributed.run --standalone --nproc_per_node "$ranks" main.py "$@" "${COMMON[@]}" \
         --save "$OUT/$name" --save_model "$OUT/$name-m"; fi > "$OUT/$name.log" 2>&1
  echo "$name: $((SECONDS - start)) s wall"
}
compare() {  # compare A B: perplexities and weight differences of two runs
  "$PY" - "$OUT/$1" "$OUT/$2" <<'PYEOF'
import json, sys, glob, torch
from safetensors.torch import load_file
def w(d):
    out = {}
    for f in sorted(glob.glob(d + "-m/*.safetensors")):
        out.update(load_file(f))
    return out
a, b = sys.argv[1:3]
x, y = w(a), w(b)
ra, rb = (json.load(open(d + "/results.json")) for d in (a, b))
zeros = sum(int(((x[k] == 0) != (y[k] == 0)).sum()) for k in x)
diff = max(float((x[k].float() - y[k].float()).abs().max()) for k in x)
print(f"  {a} vs {b}: ppl {ra['perplexity']} vs {rb['perplexity']}; zero-pattern diffs {zeros}; max weight diff {diff:.3g}")
for r in (ra, rb):
    d = (r.get("recovery") or {}).get("distill")
    if d:
        print(f"  distill: KL {d['held_out_kl_before']:.4f} -> {d['held_out_kl_after']:.4f}, ranks {d.get('ranks', 1)}")
PYEOF
}
for job in "sparsegpt 0.5" "alps 0.7"; do
  set -- $job
  run "$1-1gpu" 1 --prune_method "$1" --sparsity_ratio "$2"
  run "$1-${N}gpu" "$N" --prune_method "$1" --sparsity_ratio "$2"
  compare "$1-1gpu" "$1-${N}gpu"
done
DISTILL=(--prune_method sparsegpt --sparsity_ratio 0.5 --distill_steps 20 --distill_batch $((2 * N)) --distill_windows 32)
run distill-1gpu 1 "${DISTILL[@]}"
run "distill-${N}gpu" "$N" "${DISTILL[@]}"
compare distill-1gpu "distill-${N}gpu"
cat > "$OUT/hang.py" <<'PYEOF'
import os, sys, time
sys.path.insert(0, os.getcwd())
from mosaic import calibrate
from mosaic.cli import main
run_layer = calibrate._run_layer
def hang(adapter, layers, index, *a, **k):
    if index == 1 and os.environ.get("RANK") == "1":
        time.sleep(3600)
    return run_layer(adapter, layers, index, *a, **k)
calibrate._run_layer = hang
raise SystemExit(main(prog="main.py"))
PYEOF
start=$SECONDS
if timeout 300 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$N" "$OUT/hang.py" \
     --prune_method sparsegpt --sparsity_ratio 0.5 "${COMMON[@]}" --dist_timeout 30 > "$OUT/hang.log" 2>&1; then
  echo "hung rank: the run did NOT fail" >&2; exit 1
fi
echo "hung rank: ended after $((SECONDS - start)) s: $(grep -m1 'main.py: error' "$OUT/hang.log" || echo 'no one-line error')"
