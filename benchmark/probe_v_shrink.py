"""Probe: is the perplexity *gain* of V-only KV pruning on SparseGPT-50% weights only a shrinking of V?

Per-token magnitude pruning of a value vector keeps its largest entries, so it also shrinks the vector's
norm. This probe measures that shrinkage at 70% (the share of each value vector's L2 norm kept, on the
calibration text) and then evaluates, with a dense cache, the model whose values are all scaled by that
one factor (v_proj's weight times r; SmolLM2 has no v_proj bias): if the scaled model gains as much as
the pruned cache, the gain is the shrinkage, not the choice of entries. Nothing here is tuned: r is
measured on calibration windows, the perplexity on the same 16 eval windows as ``bench_kv.py``.

    python benchmark/probe_v_shrink.py     # appends to results/kv_probe_v_shrink.jsonl
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kv import EVAL, load  # noqa: E402
from common import RESULTS, cpu_label, machine  # noqa: E402

OUT = RESULTS / "kv_probe_v_shrink.jsonl"
SPARSITY = 0.7


@torch.no_grad()
def kept_norm(model, windows: torch.Tensor, sparsity: float) -> float:
    """Mean over layers, tokens and KV heads of ||top-k(v)|| / ||v||, k the count the cache keeps."""
    from mosaic.adapter import adapter_for
    from mosaic.kv.prune import prune_count
    from mosaic.kv.report import head_dim

    adapter = adapter_for(model)
    dim = head_dim(model)
    keep = dim - prune_count(dim, sparsity)
    ratios = []

    def hook(_module, _inputs, out):
        v = out.float().reshape(*out.shape[:-1], -1, dim)
        top = v.abs().topk(keep, dim=-1).values
        ratios.append(float((top.norm(dim=-1) / v.norm(dim=-1).clamp_min(1e-12)).mean()))

    handles = [adapter.projection(layer, "v").register_forward_hook(hook)
               for layer in adapter.layers(model)]
    try:
        for w in windows:
            model(input_ids=w[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return sum(ratios) / len(ratios)


@torch.no_grad()
def scaled_ppl(model, tokenizer, factor: float) -> float:
    from mosaic.adapter import adapter_for
    from mosaic.data import eval_tokens
    from mosaic.eval.perplexity import perplexity

    adapter = adapter_for(model)
    weights = [adapter.projection(layer, "v").weight for layer in adapter.layers(model)]
    saved = [w.clone() for w in weights]
    try:
        for w in weights:
            w.mul_(factor)
        ids = eval_tokens(tokenizer, EVAL["dataset"])
        return perplexity(model, adapter, ids, EVAL["seqlen"], EVAL["windows"])["ppl"]
    finally:
        for w, s in zip(weights, saved):
            w.copy_(s)


def main() -> None:
    from mosaic.data import calibration_windows
    from mosaic.kv import allocate as kvalloc

    for weights in ("sparsegpt50", "dense"):
        start = time.perf_counter()
        model, tokenizer = load(weights)
        windows = calibration_windows(tokenizer, "wiki-offline", kvalloc.WINDOWS, kvalloc.SEQLEN, seed=0)
        r = kept_norm(model, windows, SPARSITY)
        row = {"weights": weights, "sparsity": SPARSITY, "kept_norm": r,
               "ppl_v_scaled": scaled_ppl(model, tokenizer, r),
               "cpu": cpu_label(machine()), "seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps(row))
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
