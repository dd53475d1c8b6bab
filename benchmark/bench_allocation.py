"""Allocation benchmark, like for like: {Wanda, SparseGPT} × statistics source {sequential, dense} ×
allocation {uniform, owl, mosaic, mosaic_ref} × S ∈ {0.5 … 0.8}.

Within one (method, statistics, S) row the four allocations differ in the allocation only: the same
kernel, the same calibration windows, and the same statistics source (``--calib_stats``) for the
pruning itself. Across the two statistics rows only ``--calib_stats`` differs.

SmolLM2-135M, 32 × 512 calibration windows of wiki-offline (seed 0), perplexity on the first 8 windows
× 2048 tokens of the held-out wiki-offline split with bf16 forwards (``--eval_dtype bfloat16``). M = 5,
λ = 0.08 (the defaults; never tuned on the eval split). Each job is one ``mosaic.pipeline.run`` with a
freshly loaded model, in this process; finished jobs are kept in ``results/allocation_runs.jsonl``, so
an interrupted sweep resumes where it stopped.

    python benchmark/bench_allocation.py            # ~90 min on 2 idle cores
    python benchmark/bench_allocation.py --report   # only rebuild the table from the finished jobs
"""

from __future__ import annotations

import sys
import time
from operator import itemgetter

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import RESULTS, append, finished, machine, machine_line, not_measured, notes, write  # noqa: E402

METHODS = ("wanda", "sparsegpt")
STATS = ("sequential", "dense")
ALLOCATIONS = ("uniform", "owl", "mosaic", "mosaic_ref")
SPARSITIES = (0.7, 0.8, 0.6, 0.5)  # the most informative first, in case the sweep is cut short
RUNS = RESULTS / "allocation_runs.jsonl"
SETTINGS = dict(nsamples=32, seqlen=512, eval_windows=8, eval_dtype="bfloat16")
CELL = itemgetter("method", "stats", "allocation", "target")  # a finished job's cell in the grid


def run_one(method: str, stats: str, allocation: str, sparsity: float) -> dict:
    from mosaic.pipeline import Options, run

    start = time.perf_counter()
    r = run(Options(prune_method=method, allocation=allocation, sparsity_ratio=sparsity, calib_stats=stats,
                    **SETTINGS))
    s = r["sparsity"]
    return {"method": method, "stats": stats, "allocation": allocation, "target": sparsity,
            "achieved": s["achieved"], "drift": s.get("drift", 0.0),
            "ppl": r["perplexity"]["wiki-offline"]["ppl"],
            "mode": r["settings"]["mode"], "calib_dtype": r["settings"]["calib_dtype"],
            "prune_s": round(r["time_s"].get("prune", 0) + r["time_s"].get("profile", 0), 1),
            "wall_s": round(time.perf_counter() - start, 1)}


def sweep() -> None:
    done = finished(RUNS, CELL)
    for sparsity in SPARSITIES:
        for method in METHODS:
            for stats in STATS:
                for allocation in ALLOCATIONS:
                    if (method, stats, allocation, sparsity) not in done:
                        append(RUNS, run_one(method, stats, allocation, sparsity))


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(STATS), len(METHODS), figsize=(5 * len(METHODS), 4 * len(STATS)),
                             sharey=True)
    for i, stats in enumerate(STATS):
        for j, method in enumerate(METHODS):
            ax = axes[i][j]
            for allocation in ALLOCATIONS:
                pts = sorted((r["target"] * 100, r["ppl"]) for r in rows
                             if (r["method"], r["stats"], r["allocation"]) == (method, stats, allocation))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=allocation)
            ax.set_yscale("log")
            ax.set_title(f"{method}, {stats} statistics", fontsize=10)
            ax.set_xlabel("target sparsity of the decoder projections (%)")
            ax.grid(alpha=0.3)
        axes[i][0].set_ylabel("perplexity, wiki-offline (8 × 2048)")
    axes[0][0].legend()
    fig.suptitle("SmolLM2-135M: allocations compared with the same statistics source", fontsize=11)
    fig.tight_layout()
    fig.savefig(RESULTS / "allocation.png", dpi=120)


def _cell(by: dict, *k) -> str:
    return f"{by[k]['ppl']:.2f}" if k in by else "—"


def report(m: dict) -> None:
    by = finished(RUNS, CELL)
    rows = list(by.values())
    plot(rows)
    lines = ["# Allocation benchmark: SmolLM2-135M, like for like", "",
             f"Machine: {machine_line(m)}.", "",
             "Settings: calibration 32 × 512 tokens of wiki-offline (seed 0); perplexity on the first 8 "
             "windows × 2048 tokens of the held-out wiki-offline split with bf16 forwards (`--eval_dtype "
             "bfloat16`); `--Hyper_m 5 --Lamda 0.08` (defaults, never tuned on the eval split); model fp32, "
             "calibration forwards bf16 (auto). Produced by `python benchmark/bench_allocation.py`; plot: "
             "`allocation.png`.", "",
             "**What each comparison holds fixed.** Within a row, the four allocations share the kernel, the "
             "calibration windows and the statistics source the weights are pruned from (`--calib_stats`); "
             "only the per-projection sparsities differ. `sequential`: each layer is pruned from the "
             "activations of the already-pruned layers before it (true-sequential within the layer; the "
             "reference pruning pass). `dense`: from the dense model's activations (Wanda prunes from the "
             "profiling pass's own statistics). The outlier profile that drives owl/mosaic/mosaic_ref always "
             "comes from the dense model. Rows with the same method and S differ in the statistics source "
             "only.", "",
             "| method | statistics | S | uniform | owl | mosaic | mosaic_ref | mosaic vs uniform |",
             "|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        for s in sorted(SPARSITIES):
            for stats in STATS:
                cells = [_cell(by, method, stats, a, s) for a in ALLOCATIONS]
                have = [a for a in ALLOCATIONS if (method, stats, a, s) in by]
                if not have:
                    continue
                best = min(have, key=lambda a: by[(method, stats, a, s)]["ppl"])
                cells = [f"**{c}**" if a == best else c for a, c in zip(ALLOCATIONS, cells)]
                u, mo = by.get((method, stats, "uniform", s)), by.get((method, stats, "mosaic", s))
                gain = f"{mo['ppl'] / u['ppl'] - 1:+.1%}" if u and mo else "—"
                lines.append(f"| {method} | {stats} | {s} | {' | '.join(cells)} | {gain} |")
    lines += ["", "Statistics source alone (same allocation, same kernel): dense vs sequential perplexity.",
              "",
              "| method | S | " + " | ".join(f"{a}: dense / sequential" for a in ALLOCATIONS) + " |",
              "|---|---|" + "---|" * len(ALLOCATIONS)]
    for method in METHODS:
        for s in sorted(SPARSITIES):
            cells = []
            for a in ALLOCATIONS:
                d, q = by.get((method, "dense", a, s)), by.get((method, "sequential", a, s))
                cells.append(f"{d['ppl'] / q['ppl'] - 1:+.0%}" if d and q else "—")
            if set(cells) == {"—"}:
                continue
            lines.append(f"| {method} | {s} | " + " | ".join(cells) + " |")
    lines += ["", "Achieved overall sparsity, mosaic_ref's drift from the target, and profile + prune wall "
                  "time (s; indicative only: this sweep shared the 2 cores with other jobs, so times are not "
                  "comparable between cells; `core.md` has timings on an idle machine):", "",
              "| method | statistics | S | " + " | ".join(f"{a}" for a in ALLOCATIONS) + " |",
              "|---|---|---|" + "---|" * len(ALLOCATIONS)]
    for method in METHODS:
        for s in sorted(SPARSITIES):
            for stats in STATS:
                if not any((method, stats, a, s) in by for a in ALLOCATIONS):
                    continue
                cells = []
                for a in ALLOCATIONS:
                    r = by.get((method, stats, a, s))
                    cells.append("—" if r is None else f"{r['achieved']:.4f} / {r['prune_s']:.0f} s"
                                 + (f" (drift {r['drift']:+.4f})" if a == "mosaic_ref" else ""))
                lines.append(f"| {method} | {stats} | {s} | " + " | ".join(cells) + " |")
    missing = [f"{m} {st} S={s}" for s in sorted(SPARSITIES) for m in METHODS for st in STATS
               if not all((m, st, a, s) in by for a in ALLOCATIONS)]
    lines += not_measured(missing, RUNS, why="The sweep runs the most informative targets first and resumes "
                          f"where it stopped (`results/{RUNS.name}`); these cells did not fit this session's "
                          "CPU budget.")
    lines += notes("allocation")
    write("allocation", "\n".join(lines) + "\n", {"machine": m, "settings": SETTINGS, "rows": rows})


if __name__ == "__main__":
    m = machine()
    if "--report" not in sys.argv:
        sweep()
    report(m)
