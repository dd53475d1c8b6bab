"""Allocation search vs the rules on SmolLM2-135M: {SparseGPT, Wanda} × {uniform, owl, mosaic, search} ×
S ∈ {0.7, 0.6, 0.5, 0.8}: perplexity, search time, and the KL each allocation reaches. `search` runs at the
default --search_budget (16 generations of evolutionary refinement); rows measured with budget 0 (the curve
solve alone) are kept beside them, so the refinement's own gain is read within a row.

Within one (kernel, S) row only the allocation differs: the same 32 × 512 calibration windows of
wiki-offline (seed 0), the same sequential statistics (the default) for the pruning itself, the same
kernel. `search` additionally holds out the 8 windows drawn after those 32 (never used for statistics)
to score allocations; every knob was fixed before looking at the evaluation split. Perplexity on the
first 16 windows × 2048 tokens of the held-out wiki-offline split, bf16 forwards. The KL column is the
search's own fitness: KL(dense ‖ pruned) per token on the held-out calibration windows, with every
projection pruned from the dense statistics (the search's surrogate), for uniform, the mosaic seed and
the search's solution. Rows identical to `bench_alps.py`'s SparseGPT rows (same options) are read from
`alps_runs.jsonl` instead of being run again. Finished jobs are kept in ``results/search_runs.jsonl``.

    python benchmark/bench_search.py            # the whole grid: ~3 h on 2 idle cores
    python benchmark/bench_search.py --report   # only rebuild the table
    python benchmark/bench_search.py --only=sparsegpt:search:0.6,wanda:owl:0.5   # just those cells
    OMP_NUM_THREADS=1 python benchmark/bench_search.py --only=... --shared-machine   # two jobs at once
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    append,
    finished,
    machine,
    machine_line,
    not_measured,
    notes,
    parse_only,
    read_runs,
    write,
)

KERNELS = ("sparsegpt", "wanda", "alps")
ALLOCATIONS = ("uniform", "owl", "mosaic", "search")
BUDGET = 16  # the default --search_budget
SPARSITIES = (0.7, 0.6, 0.5, 0.8)
ALPS_CELLS = {("alps", "uniform", 0.7), ("alps", "search", 0.7)}  # alps_search against alps, at 70% only


def grid() -> list[tuple[str, str, float]]:
    """Every (kernel, allocation, S) cell in the order they run: the two kernels at every allocation and
    sparsity, ALPS only where it answers the one question asked of it (alps_search vs alps at 70%)."""
    return [(k, a, s) for s in SPARSITIES for k in KERNELS for a in ALLOCATIONS
            if k != "alps" or (k, a, s) in ALPS_CELLS]
RUNS = RESULTS / "search_runs.jsonl"
SHARED = RESULTS / "alps_runs.jsonl"  # the same SparseGPT settings, measured by bench_alps.py
SETTINGS = dict(nsamples=32, seqlen=512, eval_windows=16, eval_dtype="float32")
EVAL = SETTINGS["eval_dtype"]  # rows without an eval_dtype field used bf16 forwards (a Xeon with native bf16)


def rows() -> dict[tuple, dict]:
    """The finished jobs by key(), re-read each time: a job run beside this one may have added rows."""
    shared = {key(r): {**r, "from": SHARED.name} for r in read_runs(SHARED)
              if r["kernel"] == "sparsegpt" and r["type"] == "unstructured"}
    return {**shared, **finished(RUNS, key)}


def key(r: dict) -> tuple:
    """(forwards' dtype, kernel, allocation, S); search rows name their budget: search@16, search@0 (rows
    before the refinement existed ran the curve solve alone)."""
    allocation = r["allocation"]
    if allocation == "search":
        allocation = f"search@{r.get('budget', 0)}"
    return r.get("eval_dtype", "bfloat16"), r["kernel"], allocation, r["target"]


def run_one(kernel: str, allocation: str, sparsity: float) -> dict:
    from mosaic.pipeline import Options, run

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # the map, for what the search learned
        mapped = Path(tmp) / "map.json"
        r = run(Options(prune_method=kernel, allocation=allocation, sparsity_ratio=sparsity,
                        search_budget=BUDGET, allocation_file=str(mapped), **SETTINGS))
        sparsity_map = json.loads(mapped.read_text())["sparsity"]
    row = {"kernel": kernel, "allocation": allocation, "target": sparsity, "eval_dtype": EVAL,
           "cpu": machine()["cpu"], "achieved": r["sparsity"]["achieved"],
           "ppl": r["perplexity"]["wiki-offline"]["ppl"], "prune_s": round(r["time_s"].get("prune", 0), 1),
           "search_s": round(r["time_s"].get("search", 0), 1),
           "wall_s": round(time.perf_counter() - start, 1)}
    if "search" in r:
        row["search"], row["budget"], row["map"] = r["search"], BUDGET, sparsity_map
    if SHARED_MACHINE:  # times from such rows are not comparable with idle ones
        row["shared_machine"] = f"{torch.get_num_threads()} torch thread(s), another benchmark job beside it"
    return row


SMOLLM2 = {"q": 576 * 576, "k": 192 * 576, "v": 192 * 576, "o": 576 * 576, "gate": 1536 * 576,
           "up": 1536 * 576, "down": 576 * 1536}  # weights per projection, every layer alike


def profile(sparsity: list[dict]) -> list[str]:
    """Mean sparsity per projection type, then parameter-weighted per third of the layers."""
    by_type = [sum(row[p] for row in sparsity) / len(sparsity) for p in SMOLLM2]
    third = -(-len(sparsity) // 3)
    total = sum(SMOLLM2.values())
    by_depth = [sum(SMOLLM2[p] * row[p] for row in part for p in SMOLLM2) / (len(part) * total)
                for part in (sparsity[:third], sparsity[third:2 * third], sparsity[2 * third:])]
    return [f"{v:.2f}" for v in by_type + by_depth]


def table(by: dict, dtype: str) -> list[str]:
    """Perplexity per (kernel, S) for one forwards dtype, with the search's time and KL figures."""
    lines = ["| kernel | S | uniform | owl | mosaic | search, curves only | search | search vs uniform | "
             "search time s | surrogate KL: uniform / mosaic / curves | refinement KL: start → refined | "
             "validation KL: start / refined | chosen |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    columns = ("uniform", "owl", "mosaic", "search@0", f"search@{BUDGET}")
    for kernel in KERNELS:
        for s in sorted(SPARSITIES):
            got = {a: by.get((dtype, kernel, a, s)) for a in columns}
            cells = [f"{r['ppl']:.2f}" if r else "—" for r in got.values()]
            if set(cells) == {"—"}:
                continue
            u, q = got["uniform"], got[f"search@{BUDGET}"] or got["search@0"]
            gain = f"{q['ppl'] / u['ppl'] - 1:+.1%}" if u and q else "—"
            t = (f"{q['search_s']:.0f}" + (" ‡" if "shared_machine" in q else "")) if q else "—"
            lines.append(f"| {kernel} | {s} | {' | '.join(cells)} | {gain} | {t} | {kl_cells(q)} |")
    return lines


def kl_cells(q: dict | None) -> str:
    """The search's KL figures: the guard's surrogate, the refinement, the final judgement, the choice."""
    if not q:
        return "— | — | — | —"
    fit, evo = q["search"]["fitness_kl"], q["search"].get("evolution") or {}
    surrogate = " / ".join(f"{fit[k]:.3f}" if k in fit else "—" for k in ("uniform", "seed", "search"))
    dagger = "" if evo.get("statistics") == "as shipped" else " †"
    refined = f"{evo['start_kl']:.3f} → {evo['kl']:.3f}{dagger}" if evo else "—"
    judged = evo.get("validation_kl_final", {})
    val = (" / ".join(f"{judged[k]:.3f}" if k in judged else "—" for k in (evo.get("from"), "evolved"))
           if judged else "—")
    return f"{surrogate} | {refined} | {val} | {q['search']['chosen']}"


def alps_table(by: dict) -> list[str]:
    """alps_search against alps (uniform) at 70%: perplexity and where the time goes."""
    cells = {a: by.get((EVAL, "alps", a, 0.7)) for a in ("uniform", f"search@{BUDGET}")}
    if not any(cells.values()):
        return []
    lines = ["", f"`alps_search` against `alps` at 70% ({EVAL} forwards, the settings above; only the "
                 "allocation differs):", "",
             "| method | ppl | vs alps | prune s | search s | whole job s |", "|---|---|---|---|---|---|"]
    u = cells["uniform"]
    for name, r in zip(("alps", "alps_search"), cells.values()):
        if r is None:
            lines.append(f"| {name} | — | — | — | — | — |")
            continue
        mark = " ‡" if "shared_machine" in r else ""
        gain = f"{r['ppl'] / u['ppl'] - 1:+.1%}" if u and r is not u else "—"
        lines.append(f"| {name} | {r['ppl']:.2f} | {gain} | {r['prune_s']:.0f}{mark} | "
                     f"{r['search_s']:.0f}{mark} | {r['wall_s']:.0f}{mark} |")
    return lines


def sweep(only: set | None = None) -> None:
    for kernel, allocation, sparsity in grid():
        wanted = f"search@{BUDGET}" if allocation == "search" else allocation
        if only and (kernel, allocation, sparsity) not in only:
            continue
        if (EVAL, kernel, wanted, sparsity) not in rows():  # re-read: a parallel job may add rows
            append(RUNS, run_one(kernel, allocation, sparsity))


def report(m: dict) -> None:
    by = rows()
    lines = ["# Allocation search vs the rules: SmolLM2-135M", "",
             f"Machine (this report): {machine_line(m)}.", "",
             "Settings: calibration 32 × 512 tokens of wiki-offline (seed 0), sequential statistics, 1% "
             "damping; `search` holds out the next 8 calibration windows; perplexity on the first 16 windows "
             "× 2048 tokens of the held-out wiki-offline split; M = 5, λ = 0.08 for owl/mosaic. Within a row "
             "only the allocation differs. Produced by `python benchmark/bench_search.py`."]
    for dtype, title in (("float32", "fp32 forwards (this machine, an AMD EPYC without native bf16)"),
                         ("bfloat16", "bf16 forwards (earlier sessions, on a Xeon with native bf16)")):
        if any(k[0] == dtype for k in by):
            lines += ["", f"## {title}", ""] + table(by, dtype)
    lines += ["", f"*search* is the default budget ({BUDGET} generations of refinement by true KL; rows of "
                  "earlier defaults are kept in `search_runs.jsonl`); *search, curves only* ran with "
                  "`--search_budget 0`. *search vs uniform* uses the refined row where it exists. The two "
                  "tables differ in the forwards' dtype and the CPU (bf16 on a CPU without native bf16 is "
                  "~50× slower than fp32), so compare within a table only. The KL columns come from the "
                  "search's own run, in nats per token. *Surrogate*: held-out calibration windows, every "
                  "projection pruned from the dense statistics (the guard's score). *Refinement*: held-out "
                  "windows, the start pruned as shipped (sequential statistics) and the refined map "
                  "re-pruned with those statistics (rows marked † refined the dense surrogate, an earlier "
                  "version). *Validation*: windows after the held-out ones, both maps pruned as shipped; the "
                  "lower one is chosen. ‡: the time of a run made while another benchmark job shared the 2 "
                  "cores, not an idle time (perplexity and KL are unaffected)."]
    lines += alps_table(by)
    missing = [f"{k} {a} {s}" for k, a, s in sorted(grid(), key=lambda c: c[2])
               if (EVAL, k, f"search@{BUDGET}" if a == "search" else a, s) not in by]
    lines += not_measured(missing, RUNS, f"Not measured (yet) with {EVAL} forwards")
    learned = [r for r in by.values() if "map" in r]
    if learned:
        lines += ["", "What each search map prunes (from its allocation file): the mean sparsity by "
                      "projection type, and the parameter-weighted mean by thirds of the depth.", "",
                  "| kernel | S | budget | forwards | q | k | v | o | gate | up | down | first third | "
                  "middle | last third |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(learned, key=lambda r: (r["kernel"], r["target"], r["budget"], key(r)[0])):
            lines.append(f"| {r['kernel']} | {r['target']} | {r['budget']} | {key(r)[0]} | "
                         + " | ".join(profile(r["map"])) + " |")
    lines += notes("search")
    write("search", "\n".join(lines) + "\n", {"machine": m, "settings": SETTINGS, "rows": list(by.values())})


SHARED_MACHINE = "--shared-machine" in sys.argv  # say so when another job runs beside this one

if __name__ == "__main__":
    m = machine()
    if "--report" not in sys.argv:  # --only=sparsegpt:search:0.7,... runs just those cells
        only = parse_only(sys.argv)
        sweep(None if only is None else {(k, a, float(s)) for k, a, s in (c.split(":") for c in only)})
    report(m)
