"""What the calibration forwards' precision changes: every job runs twice, with ``--calib_dtype float32``
and ``--calib_dtype bfloat16``, everything else held fixed (SmolLM2-135M in fp32, 32 × 512 windows of
wiki-offline, seed 0, sequential statistics, perplexity on the first 16 windows × 2048 tokens of the
held-out wiki-offline eval split, evaluated in fp32). The weights, the statistics and the kernels' math are
fp32 in both; only the layer forwards that produce the statistics (and the next layer's inputs) differ.

    python benchmark/bench_calib_dtype.py            # the grid (resumes from results/calib_dtype_runs.jsonl)
    python benchmark/bench_calib_dtype.py --report   # only rebuild results/calib_dtype.md
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append, cpu_label, finished, machine, notes, write  # noqa: E402

RUNS = RESULTS / "calib_dtype_runs.jsonl"
SETTINGS = dict(nsamples=32, seqlen=512, eval_windows=16, seed=0)
DTYPES = ("float32", "bfloat16")
PRUNINGS = {
    "wanda-0.5": dict(prune_method="wanda", sparsity_ratio=0.5),
    "wanda-0.7": dict(prune_method="wanda", sparsity_ratio=0.7),
    "sparsegpt-0.5": dict(prune_method="sparsegpt", sparsity_ratio=0.5),
    "sparsegpt-0.7": dict(prune_method="sparsegpt", sparsity_ratio=0.7),
    "alps-0.5": dict(prune_method="alps", sparsity_ratio=0.5),
    "alps-0.7": dict(prune_method="alps", sparsity_ratio=0.7),
    # one reconstruction row: the layer's dense targets and pruned inputs come from these forwards too
    "sparsegpt-0.7+recon": dict(prune_method="sparsegpt", sparsity_ratio=0.7, reconstruct="layer"),
}


def key(row: dict) -> tuple[str, str, str]:
    return row["name"], row["calib_dtype"], row["machine"]


def run_one(name: str, dtype: str) -> dict:
    from mosaic.pipeline import Options, run

    m, start = machine(), time.perf_counter()
    r = run(Options(**SETTINGS, **PRUNINGS[name], calib_dtype=dtype, eval_dtype="float32"))
    return {"name": name, "calib_dtype": r["settings"]["calib_dtype"], "options": PRUNINGS[name],
            "achieved": r["sparsity"]["achieved"], "ppl": r["perplexity"]["wiki-offline"]["ppl"],
            "time_s": {k: round(v, 1) for k, v in r["time_s"].items()},
            "wall_s": round(time.perf_counter() - start, 1), "machine": cpu_label(m), "date": m["date"],
            "shared_machine": "--shared-machine" in sys.argv}


def sweep() -> None:
    here = cpu_label(machine())
    done = finished(RUNS, key)
    for name in PRUNINGS:
        for dtype in DTYPES:
            if (name, dtype, here) not in done:
                append(RUNS, run_one(name, dtype))


def report() -> None:
    rows = finished(RUNS, key)
    cpus = sorted({r["machine"] for r in rows.values()})
    lines = ["# Calibration precision: fp32 vs bf16 forwards", "",
             "Each row: one pruning, run twice with only `--calib_dtype` changed (SmolLM2-135M fp32 weights; "
             "32 × 512 calibration windows of wiki-offline, seed 0; sequential statistics; perplexity on the "
             "first 16 × 2048-token windows of the wiki-offline eval split, fp32 evaluation). Times are the "
             "`prune` phase (calibration forwards, kernels, reconstruction).", ""]
    for cpu in cpus:
        lines += [f"CPU: {cpu}", "",
                  "| pruning | ppl fp32 calib | ppl bf16 calib | bf16 vs fp32 | prune s fp32 | prune s bf16 |"
                  " timed idle |", "|---|---|---|---|---|---|---|"]
        for name in PRUNINGS:
            a, b = rows.get((name, "float32", cpu)), rows.get((name, "bfloat16", cpu))
            if a is None or b is None:
                have = f"{a['ppl']:.3f}" if a else "—"
                lines.append(f"| {name} | {have} | (not measured yet) | | | | |")
                continue
            idle = "no" if a.get("shared_machine") or b.get("shared_machine") else "yes"
            change = 100 * (b["ppl"] / a["ppl"] - 1)
            lines.append(f"| {name} | {a['ppl']:.3f} | {b['ppl']:.3f} | {change:+.2f}% "
                         f"| {a['time_s']['prune']:.0f} | {b['time_s']['prune']:.0f} | {idle} |")
        lines.append("")
    write("calib_dtype", "\n".join(lines + notes("calib_dtype")) + "\n",
          {"runs": list(rows.values())})


if __name__ == "__main__":
    if "--report" not in sys.argv:
        sweep()
    report()
