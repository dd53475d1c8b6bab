"""Allocation benchmark: Wanda and SparseGPT × {uniform, owl, mosaic, mosaic_ref} × S ∈ {0.5 … 0.8}.

SmolLM2-135M, 32 × 512 calibration windows of wiki-offline (seed 0), perplexity on the first 16 windows
× 2048 tokens of the held-out wiki-offline split, evaluated with bf16 forwards (``--eval_dtype
bfloat16``, half the CPU time of fp32; the dense model gives the same ppl to two decimals). M = 5 and
λ = 0.08 (the defaults) were chosen on calibration-split text only. Every job runs main.py in a fresh
process.

    python benchmark/bench_allocation.py      # ~50 min on 2 cores
"""

from __future__ import annotations

import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import RESULTS, YARDSTICK, machine, machine_line, run_main, write  # noqa: E402

METHODS = ("wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl", "mosaic", "mosaic_ref")
SPARSITIES = (0.5, 0.6, 0.7, 0.8)
NOTES = """
Notes (what we found; targets judged on this table, never tuned on the eval split):
- Wanda: the per-projection `mosaic` allocation is the best of the four at 0.7 (−28% vs uniform) and 0.8
  (−72%), but loses to uniform at 0.6 (+19%) and ties at 0.5. OWL's per-layer rule helps at 0.5 and 0.7 only.
- SparseGPT: its weight update compensates most of what an allocation changes; uniform, owl and mosaic stay within ±9% of
  uniform, `mosaic` is best only at 0.6 (−7%) and is +2% at 0.8. So the issue's target (mosaic lowest at
  every S ≥ 0.6 and ≥30% below uniform at 0.8) is met for Wanda at 0.7/0.8 only.
- Why: probes on calibration-split text (Wanda 70%, one projection type held at 0.6 while the rest
  compensate) found SmolLM2's MLP (gate, up) sensitive and its attention projections robust; outlier
  ratios only partly track that. With M = 3 every outlier-guided allocation was worse than uniform; M = 5,
  λ = 0.08 (the papers' defaults) was the best setting we tried on calibration text.
- `mosaic_ref` (the released code's formula) drifts −0.0005 from the target at every S and is the worst
  or next-worst allocation at every point above 0.5.
- Pruning times are indicative: a few cells (Wanda mosaic 0.5, owl 0.6) were slowed by other work on the
  2 cores; `core.md` has the timings taken on an idle machine. Outlier-guided SparseGPT runs take ~20 s
  more than uniform: a dense profiling pass before the sequential pruning.
- SmolLM2 here is de-quantized Q4_1, so absolute perplexities are those of that model.
"""


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METHODS), figsize=(5 * len(METHODS), 4), sharey=True)
    for ax, method in zip(axes, METHODS):
        for allocation in ALLOCATIONS:
            pts = sorted((r["achieved"] * 100, r["ppl"]) for r in rows
                         if r["method"] == method and r["allocation"] == allocation)
            ax.plot(*zip(*pts), marker="o", label=allocation)
        ax.set_yscale("log")
        ax.set_xlabel("removed parameters of the decoder projections (%)")
        ax.set_title(f"{method}, SmolLM2-135M")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("perplexity, wiki-offline (16 × 2048)")
    axes[0].legend()
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "allocation.png", dpi=120)


def main() -> None:
    m = machine()
    rows = []
    for method in METHODS:
        for sparsity in SPARSITIES:
            for allocation in ALLOCATIONS:
                r = run_main(["--prune_method", method, "--allocation", allocation, "--sparsity_ratio", str(sparsity),
                              *YARDSTICK, "--eval_dtype", "bfloat16"])
                s = r["sparsity"]
                rows.append({"method": method, "allocation": allocation, "target": sparsity,
                             "achieved": s["achieved"], "drift": s.get("drift", 0.0),
                             "ppl": r["perplexity"]["wiki-offline"]["ppl"], "prune_s": r["time_s"]["prune"]})
                print(rows[-1], flush=True)
    plot(rows)
    by = {(r["method"], r["allocation"], r["target"]): r for r in rows}
    checks = {}
    for method in METHODS:
        best = all(min(ALLOCATIONS, key=lambda a: by[(method, a, s)]["ppl"]) == "mosaic" for s in SPARSITIES if s >= 0.6)
        gain = 1 - by[(method, "mosaic", 0.8)]["ppl"] / by[(method, "uniform", 0.8)]["ppl"]
        checks[f"{method}: mosaic lowest ppl at every S ≥ 0.6"] = best
        checks[f"{method}: mosaic ≥ 30% below uniform at 0.8 (got {gain:.0%})"] = gain >= 0.30
    lines = ["# Allocation benchmark: SmolLM2-135M, perplexity by allocation and sparsity", "",
             f"Machine: {machine_line(m)}.", "",
             "Settings: calibration 32 × 512 tokens of wiki-offline (seed 0); perplexity on the first 16 windows × "
             "2048 tokens of the held-out wiki-offline split with bf16 forwards (`--eval_dtype bfloat16`); "
             "`--Hyper_m 5 --Lamda 0.08` (defaults, tuned on calibration-split text only); model fp32, calibration "
             "forwards bf16 (auto). *Prune* is the wall time of profiling + pruning. Produced by "
             "`python benchmark/bench_allocation.py`; plot: `allocation.png`.", "",
             "| method | S | uniform | owl | mosaic | mosaic_ref | mosaic vs uniform | mosaic_ref drift |",
             "|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        for s in SPARSITIES:
            cells = [f"{by[(method, a, s)]['ppl']:.2f}" for a in ALLOCATIONS]
            best = min(ALLOCATIONS, key=lambda a: by[(method, a, s)]["ppl"])
            cells = [f"**{c}**" if a == best else c for a, c in zip(ALLOCATIONS, cells)]
            gain = by[(method, "mosaic", s)]["ppl"] / by[(method, "uniform", s)]["ppl"] - 1
            lines.append(f"| {method} | {s} | {' | '.join(cells)} | {gain:+.1%} | "
                         f"{by[(method, 'mosaic_ref', s)]['drift']:+.4f} |")
    lines += ["", "Achieved overall sparsity and pruning time (s):", "",
              "| method | S | " + " | ".join(f"{a} achieved / s" for a in ALLOCATIONS) + " |",
              "|---|---|" + "---|" * len(ALLOCATIONS)]
    for method in METHODS:
        for s in SPARSITIES:
            lines.append(f"| {method} | {s} | " + " | ".join(
                f"{by[(method, a, s)]['achieved']:.4f} / {by[(method, a, s)]['prune_s']:.1f}" for a in ALLOCATIONS) + " |")
    lines += ["", "Targets (issue 3):", *[f"- {k}: **{'met' if v else 'MISSED'}**" for k, v in checks.items()], NOTES]
    write("allocation", "\n".join(lines), {"machine": m, "rows": rows, "checks": checks})


if __name__ == "__main__":
    main()
