"""Project LLaMA-2-7B / 70B pruning needs from the measured scale sweep (`results/scale.json`).

Per decoder layer the run does (SparseGPT, sequential statistics) one forward over the calibration tokens,
one Hessian accumulation per projection group and one SparseGPT solve per projection. We count those
floating-point operations from the shapes, divide the measured prune time per layer by them (the effective
throughput of this CPU on this work), and use the throughput of the largest measured model to project the
time per layer of LLaMA-2-7B and 70B. Memory follows the streamed peak's parts: one layer + the embedding
+ the calibration activations (inputs and outputs) + the MLP intermediate paused for every batch + the
largest Hessian and SparseGPT's inverse factor, in the model's dtype, plus the libraries.

    python benchmark/project_scale.py      # writes results/scale_projection.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402

# name -> (hidden, intermediate, layers, heads, kv heads, vocabulary)
MEASURED = {
    "135m": (576, 1536, 30, 9, 3, 49152),
    "500m": (1536, 4096, 16, 12, 4, 49152),
    "1.1b": (2048, 5632, 22, 32, 4, 49152),
    "3b": (3200, 8640, 26, 32, 32, 49152),
}
TARGETS = {"LLaMA-2-7B": (4096, 11008, 32, 32, 32, 32000), "LLaMA-2-70B": (8192, 28672, 80, 64, 8, 32000)}
GPU_TFLOPS = 50.0  # assumed effective fp32/TF32 throughput on one A100/H100-class GPU for this mix


def projections(shape) -> list[tuple[int, int]]:
    """(out, in) of the seven projections of one layer."""
    h, inter, _, heads, kv, _ = shape
    head_dim = h // heads
    return [(h, h), (kv * head_dim, h), (kv * head_dim, h), (h, h), (inter, h), (inter, h), (h, inter)]


def layer_params(shape) -> int:
    return sum(o * i for o, i in projections(shape))


def layer_flops(shape, tokens: int) -> float:
    """Forward + Hessians (one per group: inputs of width h three times, and the intermediate) + SparseGPT
    (per projection about 2·out·in² for the column sweep and in³ for the inverse Cholesky factor)."""
    h, inter = shape[0], shape[1]
    forward = 2 * tokens * layer_params(shape)
    hessians = 2 * tokens * (3 * h * h + inter * inter)
    solve = sum(2 * o * i * i for o, i in projections(shape)) + 3 * h ** 3 + inter ** 3
    return forward + hessians + solve


def main() -> None:
    doc = json.loads((RESULTS / "scale.json").read_text())
    args, rows = doc["args"], doc["rows"]
    tokens = args["nsamples"] * args["seqlen"]
    lines = ["# Projection: what LLaMA-2-7B and 70B need, from the measured scale sweep", "",
             f"From `scale.json` (SparseGPT 50%, {args['nsamples']}×{args['seqlen']} calibration, fp32, this "
             "machine). Effective throughput = counted FLOPs per layer (forward, Hessians, SparseGPT solve) "
             "÷ measured prune seconds per layer.", "",
             "| measured | FLOPs per layer (G) | in memory s/layer | GFLOP/s | streamed s/layer | GFLOP/s |",
             "|---|---|---|---|---|---|"]
    rate = {}
    for r in rows:
        shape = MEASURED[r["name"]]
        f = layer_flops(shape, tokens)
        per = {m: r[m]["time_s"]["prune"] / r["layers"] for m in ("memory", "disk")}
        rate = {m: f / per[m] for m in per}  # the last (largest) model's rates are used below
        lines.append(f"| {r['name']} | {f / 1e9:.0f} | {per['memory']:.2f} | {rate['memory'] / 1e9:.0f} | "
                     f"{per['disk']:.2f} | {rate['disk'] / 1e9:.0f} |")
    lines += ["", f"Projected with the largest measured model's streamed rate ({rate['disk'] / 1e9:.0f} "
                  f"GFLOP/s on this CPU) and an assumed {GPU_TFLOPS:.0f} TFLOP/s effective on one GPU (an "
                  "A100/H100 doing this mix of large matmuls and SparseGPT's column sweep; not measured "
                  "here), for 128 × 2048 calibration tokens, the usual setting, weights in bf16:", "",
              "| model | weights GB | streamed peak host memory GB | CPU h (this machine) | "
              "GPU min (assumed) |",
              "|---|---|---|---|---|"]
    for name, shape in TARGETS.items():
        h, inter, layers, _, _, vocab = shape
        calib = 128 * 2048
        weights = (layers * layer_params(shape) + 2 * vocab * h) * 2
        peak = (layer_params(shape) * 2 + vocab * h * 2 + 2 * calib * h * 2 + calib * inter * 2
                + 2 * inter * inter * 4 + 0.6e9)
        f = layers * layer_flops(shape, calib)
        lines.append(f"| {name} | {weights / 1e9:.1f} | {peak / 1e9:.1f} | {f / rate['disk'] / 3600:.1f} | "
                     f"{f / (GPU_TFLOPS * 1e12) / 60:.1f} |")
    lines += ["", "Peak = one layer + embedding + layer inputs and outputs + every batch's MLP intermediate "
              "(bf16) + the down_proj Hessian and its inverse factor (fp32) + ~0.6 GB of libraries and text. "
              "Disk: the checkpoint in and out. Produced by `python benchmark/project_scale.py`.", ""]
    (RESULTS / "scale_projection.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
