"""Core benchmark: dense / magnitude / Wanda / SparseGPT at 50% unstructured and 2:4 on SmolLM2-135M.

Settings are the guide's yardstick: 32 × 512-token calibration windows from wiki-offline (seed 0),
perplexity on the first 16 windows of 2048 tokens of the held-out wiki-offline split. Records the
pruning wall time alone (profiling + calibration passes + kernels; not model loading, data
tokenization or evaluation), peak RSS of the whole run, and perplexity; and, as the yardstick, the time
of one plain forward pass of the calibration set. Every job runs in a fresh process.

    python benchmark/bench_core.py            # ~30 min on 2 cores; run on an otherwise idle machine
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import YARDSTICK, machine, machine_line, run_main, write  # noqa: E402


def plain_forward_seconds() -> dict:
    """One forward pass of the 32 × 512 calibration set through the whole model, batches of 8."""
    from mosaic.data import calibration_windows
    from mosaic.load import load_model

    loaded = load_model("smollm2-135m")
    windows = calibration_windows(loaded.tokenizer, "wiki-offline", 32, 512, 0)
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model = loaded.model.to(dtype)
        with torch.no_grad():
            model(windows[:8])  # warm-up
            start = time.perf_counter()
            for batch in windows.split(8):
                model(batch)
        out[name] = round(time.perf_counter() - start, 2)
    return out


JOBS = [
    ("dense", "dense", "unstructured", []),
    ("magnitude", "magnitude", "unstructured", []),
    ("wanda", "wanda", "unstructured", []),
    ("sparsegpt", "sparsegpt", "unstructured", []),
    ("wanda 2:4", "wanda", "2:4", []),
    ("sparsegpt 2:4", "sparsegpt", "2:4", []),
    ("sparsegpt 70%", "sparsegpt", "unstructured", ["--sparsity_ratio", "0.7"]),
    # the reference code's choices: fp32 forwards and its two-pass layer loop
    ("wanda · fp32 calib · reference loop", "wanda", "unstructured",
     ["--calib_dtype", "float32", "--no_true_sequential"]),
    ("sparsegpt · fp32 calib · reference loop", "sparsegpt", "unstructured",
     ["--calib_dtype", "float32", "--no_true_sequential"]),
]


def main() -> None:
    m = machine()
    fwd = plain_forward_seconds()
    rows = []
    # CORE_RESUME=rows.jsonl: reuse rows measured by an interrupted run (same machine, same settings)
    done = {}
    if os.environ.get("CORE_RESUME"):
        done = {r["label"]: r
                for r in map(json.loads, Path(os.environ["CORE_RESUME"]).read_text().splitlines())}
    for label, method, kind, extra in JOBS:
        if label in done:
            rows.append(done[label])
            continue
        r = run_main(["--prune_method", method, "--sparsity_ratio", "0.5", "--sparsity_type", kind,
                      *YARDSTICK, *extra])
        sparsity = float(extra[extra.index("--sparsity_ratio") + 1]) if "--sparsity_ratio" in extra else 0.5
        sparsity = 0.0 if method == "dense" else sparsity
        rows.append({"label": label, "method": method, "type": kind, "extra": extra, "sparsity": sparsity,
                     "prune_s": r["time_s"].get("prune"), "peak_rss_gib": r["memory"]["peak_rss_gib"],
                     "ppl": r["perplexity"]["wiki-offline"]["ppl"], "achieved": r["sparsity"]["achieved"],
                     "calib_dtype": r["settings"]["calib_dtype"], "mode": r["settings"]["mode"]})
        print(rows[-1], flush=True)
    two = 2 * fwd["float32"]
    by = {row["label"]: row for row in rows}
    checks = {
        "wanda prune ≤ 1.5 × two fp32 calibration forwards": by["wanda"]["prune_s"] <= 1.5 * two,
        "sparsegpt prune ≤ 2.5 × two fp32 calibration forwards": by["sparsegpt"]["prune_s"] <= 2.5 * two,
        "wanda 50% ≥ 2× faster than llm-compressor's 93 s at ppl ≤ 32.18 + 1%":
            by["wanda"]["prune_s"] <= 46.5 and by["wanda"]["ppl"] <= 32.18 * 1.01,
        "sparsegpt 50% ≥ 2× faster than llm-compressor's 145 s at ppl ≤ 26.45 + 1%":
            by["sparsegpt"]["prune_s"] <= 72.5 and by["sparsegpt"]["ppl"] <= 26.45 * 1.01,
        "sparsegpt 70% ≥ 2× faster than the reference code's 93 s (two threads)":
            by["sparsegpt 70%"]["prune_s"] <= 46.5,
        "ppl at 50%: sparsegpt ≤ wanda < magnitude":
            by["sparsegpt"]["ppl"] <= by["wanda"]["ppl"] < by["magnitude"]["ppl"],
    }
    lines = ["# Core benchmark: SmolLM2-135M, 50% unstructured and 2:4", "",
             f"Machine: {machine_line(m)}.", "",
             "Settings: calibration 32 × 512 tokens of wiki-offline (seed 0, batches of 8); perplexity on "
             "the first 16 windows × 2048 tokens of the held-out wiki-offline split; model fp32 on CPU; "
             "defaults otherwise (`--true_sequential`, `--calib_dtype auto` = bf16 forwards on this CPU). "
             "Statistics source: sequential for every row (`--calib_stats sequential`); magnitude uses no "
             "calibration statistics. *Prune* is the wall time of the pruning alone (calibration passes + "
             "kernels; not loading, tokenizing or evaluating). Peak RSS is of the whole run. Produced by "
             "`python benchmark/bench_core.py`.", "",
             "Yardstick: one plain forward pass of the 32 × 512 calibration set through the whole model "
             f"takes **{fwd['float32']:.1f} s** in fp32 ({fwd['bfloat16']:.1f} s in bf16).", "",
             "| run | S | type | calib dtype | engine | prune (s) | × two fp32 forwards | peak RSS (GiB) | "
             "sparsity | ppl |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        prune = "—" if row["prune_s"] is None else f"{row['prune_s']:.1f}"
        ratio = "—" if row["prune_s"] is None else f"{row['prune_s'] / two:.2f}"
        lines.append(f"| {row['label']} | {row['sparsity']} | {row['type']} | {row['calib_dtype'] or '—'} | "
                     f"{row['mode'] or '—'} | {prune} | {ratio} | {row['peak_rss_gib']:.2f} | "
                     f"{row['achieved']:.4f} | {row['ppl']:.2f} |")
    lines += ["", "Targets:", *[f"- {k}: **{'met' if v else 'MISSED'}**" for k, v in checks.items()], "",
              "For comparison (from the developers' guide, same model and settings): llm-compressor 0.14 "
              "prunes SparseGPT 50% to ppl 26.45 in 145 s and Wanda 50% to 32.18 in 93 s (one thread); the "
              "reference code's SparseGPT 70% takes 93 s (two threads). Our runs use torch's default two "
              "threads.", ""]
    write("core", "\n".join(lines), {"machine": m, "plain_forward_s": fwd, "rows": rows, "checks": checks})


if __name__ == "__main__":
    main()
