"""Inference cost of one checkpoint, in a fresh process: parameters, prefill latency, decode speed, RSS.

    python benchmark/latency.py CKPT --dtype float32     # prints one JSON line

Prefill: one forward of 1 × 512 tokens (median of 3 after a warm-up). Decode: greedy ``generate`` of
exactly 128 new tokens after a 32-token prompt, batch 1 (median of 2) and 8 (one run), after a short
warm-up; tokens/s counts every sequence's new tokens. Peak RSS is the whole process (Python, torch and
the model).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure(path: str, dtype: str, new_tokens: int = 128) -> dict:
    from mosaic.load import load_pretrained

    model = load_pretrained(path, dtype=dtype, device="cpu")
    model.eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(0, vocab, (1, 512), generator=gen)
    model(prefill_ids)  # warm-up
    out = {"params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
           "prefill_512_ms": 1000 * _median_seconds(lambda: model(prefill_ids), 3)}
    for batch in (1, 8):
        prompt = torch.randint(0, vocab, (batch, 32), generator=gen)

        def decode(prompt=prompt):
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                       pad_token_id=0)  # warm-up
        out[f"decode_b{batch}_tok_s"] = batch * new_tokens / _median_seconds(decode, 2 if batch == 1 else 1)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    print(json.dumps(measure(args.checkpoint, args.dtype)))
