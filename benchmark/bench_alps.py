"""ALPS vs SparseGPT on SmolLM2-135M: perplexity, pruning time (ALPS per phase) and ADMM iterations.

Each pair of cells differs in the kernel only: the same allocation, the same 32 × 512 calibration
windows of wiki-offline (seed 0), the same statistics source (sequential, the default: each layer is
pruned from the outputs of the already-pruned layers before it), the same damping (1%). Perplexity on
the first 16 windows × 2048 tokens of the held-out wiki-offline split, bf16 forwards. Each job is one
``mosaic.pipeline.run`` on a freshly loaded model; finished jobs are kept in ``results/alps_runs.jsonl``,
so an interrupted sweep resumes where it stopped, the most informative jobs first.

    python benchmark/bench_alps.py            # the whole grid: ~3 h on 2 idle cores
    python benchmark/bench_alps.py --report   # only rebuild the table from the finished jobs
    python benchmark/bench_alps.py --only=alps/owl/unstructured/0.7,...   # just those cells
"""

from __future__ import annotations

import sys
import time
from operator import itemgetter

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import RESULTS, append, finished, machine, machine_line, not_measured, notes, parse_only, write  # noqa: E402

KERNELS = ("sparsegpt", "alps")
RUNS = RESULTS / "alps_runs.jsonl"
SETTINGS = dict(nsamples=32, seqlen=512, eval_windows=16, eval_dtype="bfloat16")
CELL = itemgetter("kernel", "allocation", "type", "target")  # a finished job's cell in the grid
# (allocation, sparsity type, S), in the order they run
JOBS = ([("uniform", "unstructured", s) for s in (0.7, 0.8, 0.5)] + [("uniform", "2:4", 0.5)]
        + [(a, "unstructured", s) for s in (0.7, 0.8) for a in ("mosaic", "owl")]
        + [("uniform", "unstructured", s) for s in (0.6, 0.9)]
        + [(a, "unstructured", s) for s in (0.5, 0.6, 0.9) for a in ("mosaic", "owl")])


def run_one(kernel: str, allocation: str, kind: str, sparsity: float) -> dict:
    from mosaic.pipeline import Options, run

    start = time.perf_counter()
    r = run(Options(prune_method=kernel, allocation=allocation, sparsity_type=kind, sparsity_ratio=sparsity,
                    **SETTINGS))
    row = {"kernel": kernel, "allocation": allocation, "type": kind, "target": sparsity,
           "achieved": r["sparsity"]["achieved"], "ppl": r["perplexity"]["wiki-offline"]["ppl"],
           "prune_s": round(r["time_s"].get("prune", 0), 1),
           "profile_s": round(r["time_s"].get("profile", 0), 1),
           "wall_s": round(time.perf_counter() - start, 1)}
    if "alps" in r:
        row["alps"] = r["alps"]
    return row


def sweep(only: set[str] | None = None) -> None:
    """The grid in JOBS order; ``only`` names cells kernel/allocation/type/S: alps/owl/unstructured/0.7."""
    done = finished(RUNS, CELL)
    for allocation, kind, sparsity in JOBS:
        for kernel in KERNELS:
            cell = (kernel, allocation, kind, sparsity)
            if cell not in done and (not only or "/".join(map(str, cell)) in only):
                append(RUNS, run_one(*cell))


def report(m: dict) -> None:
    by = finished(RUNS, CELL)
    rows = list(by.values())
    lines = ["# ALPS vs SparseGPT: SmolLM2-135M", "", f"Machine: {machine_line(m)}.", "",
             "Settings: calibration 32 × 512 tokens of wiki-offline (seed 0), sequential statistics (the "
             "default), 1% damping; perplexity on the first 16 windows × 2048 tokens of the held-out "
             "wiki-offline split with bf16 forwards; model fp32, calibration forwards bf16 (auto). ALPS at "
             "the paper's defaults (ρ₀ 0.1, ≤ 300 ADMM iterations, 10 CG iterations). Each row differs in "
             "the kernel only. Produced by `python benchmark/bench_alps.py`.", "",
             "| allocation | type | S | SparseGPT ppl | ALPS ppl | ALPS vs SparseGPT | SparseGPT prune s | "
             "ALPS prune s (eigh / ADMM / CG) | ALPS iterations mean (min–max) |",
             "|---|---|---|---|---|---|---|---|---|"]
    seen = []
    for job in JOBS:
        if job in seen:
            continue
        seen.append(job)
        g, a = by.get(("sparsegpt", *job)), by.get(("alps", *job))
        if not g and not a:
            continue
        cells = [f"{g['ppl']:.2f}" if g else "—", f"{a['ppl']:.2f}" if a else "—",
                 f"{a['ppl'] / g['ppl'] - 1:+.1%}" if g and a else "—",
                 f"{g['prune_s']:.0f}" if g else "—"]
        if a:
            sec, it = a["alps"]["seconds"], a["alps"]["iterations"]
            cells += [f"{a['prune_s']:.0f} ({sec['eigh']:.0f} / {sec['admm']:.0f} / {sec['cg']:.0f})",
                      f"{it['mean']:.1f} ({it['min']}–{it['max']})"]
        else:
            cells += ["—", "—"]
        lines.append(f"| {job[0]} | {job[1]} | {job[2]} | " + " | ".join(cells) + " |")
    missing = [f"{k} {a} {t} {s}" for a, t, s in seen for k in KERNELS if (k, a, t, s) not in by]
    lines += not_measured(missing, RUNS)
    lines += notes("alps")
    write("alps", "\n".join(lines) + "\n", {"machine": m, "settings": SETTINGS, "rows": rows})


if __name__ == "__main__":
    m = machine()
    if "--report" not in sys.argv:
        sweep(parse_only(sys.argv))
    report(m)
