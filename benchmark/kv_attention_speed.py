"""The teacher-forced KV attention's cost on SmolLM2-135M: the fused blocked path against the general
full-product path, on the same windows, against the dense model's own attention.

Each row scores the same first ``WINDOWS`` windows × 2048 tokens of the wiki-offline eval split in fp32,
with K and V 70% per_token uniform, window 32 (the rows that prune); only the attention path differs. It
also reports how far the two pruned paths' logits are apart. Results: ``results/kv_attention_speed.md``.

    python benchmark/kv_attention_speed.py
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, write  # noqa: E402

WINDOWS, SEQLEN = 2, 2048


def score(model, windows: torch.Tensor, scope) -> tuple[float, float, torch.Tensor]:
    """(seconds, perplexity, last window's logits) of one pass over ``windows``."""
    nll, start = 0.0, time.perf_counter()
    with torch.no_grad(), scope:
        for w in windows:
            out = model(input_ids=w[None], labels=w[None])
            nll += float(out.loss)
    return time.perf_counter() - start, math.exp(nll / len(windows)), out.logits


def main() -> None:
    from mosaic.data import eval_tokens
    from mosaic.kv import KVSparsity, attention, mustafar_attention
    from mosaic.load import load_model

    loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    model = loaded.model.eval()
    ids = eval_tokens(loaded.tokenizer, "wiki-offline")
    windows = ids[: WINDOWS * SEQLEN].view(WINDOWS, SEQLEN)
    spec = KVSparsity(0.7, 0.7, window=32)
    blocked = attention._blocked

    def general(query, key, value, keys, values, mask, scaling, groups, positions, counts):
        """The full-product form for the same call (the blocked path's arguments)."""
        return attention._corrected(query, key, value, mask, scaling, groups, spec, None, counts, counts)[0]

    rows = {}
    general_name = "KV 70%: general path (two full products)"
    blocked_name, dense_name = "KV 70%: blocked fused path", "dense model, its own attention (sdpa)"
    score(model, windows[:1, :256], nullcontext())  # warm-up
    rows[dense_name] = score(model, windows, nullcontext())
    rows["KV 0%: eager arithmetic"] = score(model, windows, mustafar_attention(model, KVSparsity(0.0, 0.0)))
    attention._blocked = general
    try:
        rows[general_name] = score(model, windows, mustafar_attention(model, spec))
    finally:
        attention._blocked = blocked
    rows[blocked_name] = score(model, windows, mustafar_attention(model, spec))
    gap = float((rows[general_name][2] - rows[blocked_name][2]).abs().max())
    base = rows[dense_name][0]
    lines = ["# Teacher-forced KV attention: cost per path (SmolLM2-135M)", "",
             f"Machine: {machine_line(machine())}.", "",
             f"{WINDOWS} windows × {SEQLEN} tokens of the wiki-offline eval split, fp32; K and V 70% "
             "per_token uniform, window 32, where pruned. Only the attention path differs. Produced by "
             "`python benchmark/kv_attention_speed.py` on an otherwise idle machine unless said below.", "",
             "| path | seconds | × dense model | perplexity |", "|---|---|---|---|"]
    for name, (seconds, ppl, _) in rows.items():
        lines.append(f"| {name} | {seconds:.1f} | {seconds / base:.2f} | {ppl:.4f} |")
    lines += ["", f"Largest |logit difference| between the two 70% paths (last window): {gap:.2e}."]
    write("kv_attention_speed", "\n".join(lines) + "\n",
          {"machine": machine(), "rows": {k: v[:2] for k, v in rows.items()}, "max_logit_gap": gap})


if __name__ == "__main__":
    main()
