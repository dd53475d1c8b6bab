"""Tune the search's level range on calibration text only (never the evaluation split).

SparseGPT at S on SmolLM2, the benchmark's calibration (32 × 512 windows of wiki-offline, seed 0, 8 held-out
and 8 validation windows after them). The sensitivity curves are built once over S − 0.35 … S + 0.25 (capped
at 0.95); each variant solves over a sub-range of those levels and its map is scored two ways, both on
calibration windows: the guard's surrogate KL on the held-out windows (every projection pruned from the dense
statistics) and the KL of the model pruned as shipped (sequential statistics) on the validation windows.
Rows are appended to ``results/search_levels.jsonl``.

    python benchmark/tune_search_levels.py 0.7 [variant,...]
"""

from __future__ import annotations

import copy
import json
import sys

HERE = __import__("pathlib").Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from common import RESULTS  # noqa: E402

from mosaic import refine  # noqa: E402
from mosaic import search as S  # noqa: E402
from mosaic.options import Options, kernel_options, validate  # noqa: E402
from mosaic.pipeline import calibration, load, profile_step, prune_job  # noqa: E402
from mosaic.report import Timer  # noqa: E402
from mosaic.source import prune_in_memory  # noqa: E402

VARIANTS = {"pm0.2": (-0.2, 0.2), "lo0.3": (-0.3, 0.2), "hi0.25": (-0.2, 0.25), "pm0.3": (-0.3, 0.25),
            "all": (-0.35, 0.25)}  # pm0.2 is the shipped LEVELS


def main(target: float, names: list[str]) -> None:
    opts = Options(prune_method="sparsegpt", allocation="search", sparsity_ratio=target, search_budget=16,
                   nsamples=32, seqlen=512, eval_windows=16, eval_dtype="bfloat16")
    plan, timer = validate(opts), Timer()
    setup = load(opts, plan, timer)
    calib = calibration(setup, plan, opts, timer)
    profile = profile_step(setup, calib, plan, timer)
    model, adapter, kernel = setup.model, setup.adapter, plan.kernel
    options = kernel_options(opts, plan.kernel)
    levels = sorted({round(min(max(target + d / 100, 0.0), 0.95), 4) for d in range(-35, 26, 5)})
    stats = S.dense_hessians(model, adapter, setup.inputs(calib))
    grads = S.fisher(model, adapter, calib.windows[:opts.search_windows], 2, opts.seed)
    rows = S.curves(model, adapter, kernel, stats, grads, levels, options)
    held = refine.fitness(model, adapter, calib.held_out, 2)
    val = refine.fitness(model, adapter, calib.validation, 2)
    for name in names:
        lo, hi = VARIANTS[name]
        keep = [k for k, s in enumerate(levels) if target + lo - 1e-9 <= s <= target + hi + 1e-9]
        sub = [{p: [row[p][k] for k in keep] for p in row} for row in rows]
        sparsity = S.water_fill(sub, [levels[k] for k in keep], profile.params, target)
        shipped = copy.deepcopy(model)
        prune_in_memory(shipped, setup.adapter,
                        prune_job(setup, calib, sparsity, [plan.nm] * setup.n_layers, profile, plan, opts))
        at_bounds = sum(s in (levels[keep[0]], levels[keep[-1]]) for row in sparsity for s in row.values())
        out = {"target": target, "variant": name, "levels": [levels[k] for k in keep], "at_bounds": at_bounds,
               "kl_held_surrogate": held.reset(S.stitched(model, adapter, kernel, stats, sparsity, options)),
               "kl_validation_shipped": val.reset(shipped), "map": sparsity}
        print({k: v for k, v in out.items() if k != "map"}, flush=True)
        with (RESULTS / "search_levels.jsonl").open("a") as f:
            f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main(float(sys.argv[1]), sys.argv[2].split(",") if len(sys.argv) > 2 else list(VARIANTS))
