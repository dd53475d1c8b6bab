"""A scaling model on paper for data-parallel pruning and FSDP2 distillation of LLaMA-2-7B and 70B.

Per decoder layer (SparseGPT, sequential statistics, 128 × 2048 calibration tokens) the run does: the
layer's forward over the calibration tokens, one Hessian accumulation per projection group, one SparseGPT
solve per projection. Under N ranks the forwards and the Hessian accumulation split N ways; the solves do not
(each group's owner solves while the others wait: the next group's statistics need its result), except with
``--no_true_sequential`` where a layer's four groups can go to four owners. Communication per layer: the
all-reduce of the fp64 statistics (Σ dim² × 8 bytes, ring: 2(N−1)/N of the bytes per rank) and the broadcast
of the pruned weights in bf16. FLOPs count from the shapes (as ``project_scale.py``), compute at an assumed
effective throughput, links at an assumed bandwidth: every assumption is a constant below and in the report.

FSDP2 distillation memory per rank follows ``recover.distill_need(..., ranks=N)``: 1/N of the fp32 student
(its masters), the bf16 teacher, fp32 gradients, AdamW's moments (+ one temporary) and the masks, plus two
gathered layers of each model, plus one micro-batch's logits and checkpoints (2048 tokens).

    python benchmark/project_distributed.py     # writes results/distributed_projection.md
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402
from project_scale import TARGETS, projections  # noqa: E402

TOKENS = 128 * 2048
GPU_TFLOPS = 50.0  # effective throughput per GPU for this mix (assumed, as project_scale.py)
LINKS = {"NVLink (300 GB/s bus bandwidth)": 300e9, "100 Gb/s between machines": 12.5e9}
RANKS = (1, 2, 4, 8)
SEQ, VOCAB = 2048, 32000


def per_layer(shape) -> dict:
    h, inter = shape[0], shape[1]
    projs = projections(shape)
    params = sum(o * i for o, i in projs)
    group_dims = [h, h, h, inter]  # inputs of q/k/v, o, gate/up, down
    return {"forward": 2 * params * TOKENS,
            "hessian": sum(TOKENS * d * d for d in group_dims),  # upper triangle: half of 2·T·d²
            "solve": sum(2 * o * i * i for o, i in projs),  # SparseGPT: ~2·rows·cols² per projection
            "solve_groups": [2 * o * i * i for o, i in projs],
            "stats_bytes": 8 * sum(d * d for d in group_dims),
            "weight_bytes": 2 * params}


def layer_seconds(shape, ranks: int, bandwidth: float, parallel_groups: bool) -> float:
    p = per_layer(shape)
    compute = (p["forward"] + p["hessian"]) / ranks / (GPU_TFLOPS * 1e12)
    solve = p["solve"] / (GPU_TFLOPS * 1e12)
    if parallel_groups and ranks > 1:
        solve /= min(ranks, 4)
    comm = 0.0
    if ranks > 1:
        comm = 2 * (ranks - 1) / ranks * p["stats_bytes"] / bandwidth + p["weight_bytes"] / bandwidth
    return compute + solve + comm


def fsdp_gb(shape, ranks: int) -> float:
    h, inter, layers, heads, kv, vocab = shape
    layer = sum(o * i for o, i in projections(shape))
    numel = layer * layers  # the projections: what is distilled
    total = numel + 2 * vocab * h  # + embedding and head
    # the fp32 student (masters), the bf16 teacher, fp32 gradients, AdamW (two moments + a temporary), masks
    shares = 4 * total + 2 * total + 4 * numel + 3 * 4 * numel + numel
    gathered = 2 * 2 * layer * 2  # two layers of each model, gathered in bf16
    logits = SEQ * vocab * 4 * 5
    checkpoints = SEQ * h * 4 * (layers + 8)
    return (shares / ranks + gathered + logits + checkpoints) / 1e9


def host_gb(shape) -> float:
    h, _, layers, _, _, vocab = shape
    total = sum(o * i for o, i in projections(shape)) * layers + 2 * vocab * h
    return (2 + 2 + 4) * total / 1e9  # bf16 student and teacher, the fp32 copy


def main() -> None:
    lines = ["# Data-parallel pruning and FSDP2 distillation: a model on paper", "",
             "Not a measurement: FLOPs and bytes from the shapes, at an assumed "
             f"{GPU_TFLOPS:g} TFLOP/s per GPU and the link bandwidths named; {TOKENS:,} calibration tokens "
             "(128 × 2048), SparseGPT, sequential statistics. Script: "
             "`benchmark/project_distributed.py`.", ""]
    lines += ["## Bytes moved against compute, per decoder layer", "",
              "| model | fp64 statistics all-reduced | bf16 weights broadcast | forward + Hessian FLOPs | "
              "solve FLOPs |", "|---|---|---|---|---|"]
    for name, shape in TARGETS.items():
        p = per_layer(shape)
        lines.append(f"| {name} | {p['stats_bytes'] / 1e9:.2f} GB | {p['weight_bytes'] / 1e9:.2f} GB | "
                     f"{(p['forward'] + p['hessian']) / 1e12:.0f} TFLOP | {p['solve'] / 1e12:.1f} TFLOP |")
    for link, bw in LINKS.items():
        lines += ["", f"## Pruning time over {link}", "",
                  "| model | mode | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in RANKS)
                  + " | speed-up on 8 |", "|---|---|" + "---|" * (len(RANKS) + 1)]
        for name, shape in TARGETS.items():
            for mode, parallel in (("sequential", False), ("--no_true_sequential", True)):
                t = [shape[2] * layer_seconds(shape, n, bw, parallel) / 60 for n in RANKS]
                lines.append(f"| {name} | {mode} | " + " | ".join(f"{x:.1f} min" for x in t)
                             + f" | {t[0] / t[-1]:.1f}× |")
    lines += ["", "## FSDP2 distillation memory per GPU (bf16 student and teacher, fp32 masters)", "",
              "| model | " + " | ".join(f"{n} rank{'s' if n > 1 else ''}" for n in RANKS) + " |",
              "|---|" + "---|" * len(RANKS)]
    for name, shape in TARGETS.items():
        lines.append(f"| {name} | " + " | ".join(f"{fsdp_gb(shape, n):.1f} GB" for n in RANKS) + " |")
    host = {name: host_gb(shape) for name, shape in TARGETS.items()}
    lines += ["", "Each rank also holds on the host the unsharded bf16 student and teacher (every rank loads "
              "the whole model) and, while sharding, the student's fp32 copy: "
              + ", ".join(f"{name} ≈ {gb:.0f} GB" for name, gb in host.items())
              + " per rank, the limit of this design for 70B.",
              "", "What this leaves out, so it overestimates the speed-up: the solves are latency-bound on a "
              "GPU (small matrices, many kernel launches), the forwards of a 2-core CPU do not scale, and "
              "llm-compressor's data-parallel GPTQ measured 2.8× on 4 GPUs (Llama-3-8B: 745 → 264 s)."]
    text = "\n".join(lines) + "\n"
    (RESULTS / "distributed_projection.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
