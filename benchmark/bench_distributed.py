"""Two ranks against one process on this CPU: the same model, and what the split costs or buys.

Each job prunes SmolLM2-135M (fp32 weights, fp32 calibration forwards, 32 × 512 windows of wiki-offline,
seed 0, perplexity on 16 × 2048 tokens of the held-out split in fp32) in three layouts that differ only in
how the 2 cores are used: 1 process × 2 threads, 2 ranks × 1 thread (torchrun, gloo), 1 process × 1 thread.
Checkpoints go to a scratch folder outside the repository (``--scratch``, default /tmp), compared tensor by
tensor: zero-pattern differences and the largest weight difference.

    python benchmark/bench_distributed.py              # the grid (resumes from distributed_runs.jsonl)
    python benchmark/bench_distributed.py --report     # only rebuild results/distributed.md
    python benchmark/bench_distributed.py --shared-machine   # mark rows timed beside other work
    python benchmark/bench_distributed.py --only=sparsegpt-0.5   # one job
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    ROOT,
    YARDSTICK,
    append,
    cpu_label,
    finished,
    machine,
    notes,
    parse_only,
    write,
)

RUNS = RESULTS / "distributed_runs.jsonl"
JOBS = {
    "sparsegpt-0.5": ["--prune_method", "sparsegpt", "--sparsity_ratio", "0.5"],
    "alps-0.7": ["--prune_method", "alps", "--sparsity_ratio", "0.7"],
}
LAYOUTS = {"1x2": (1, 2), "2x1": (2, 1), "1x1": (1, 1)}  # ranks × threads per process
COMPARE = {"2x1": "1x2", "1x1": "2x1"}  # each layout against the one named
COMMON = [*YARDSTICK, "--seed", "0", "--calib_dtype", "float32", "--eval_dtype", "float32", "--overwrite"]


def scratch() -> Path:
    arg = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--scratch=")), "/tmp")
    return Path(arg) / "mosaic-bench-distributed"


def checkpoint(job: str, layout: str) -> Path:
    return scratch() / job / layout


def weights(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare(a: Path, b: Path) -> dict:
    x, y = weights(a), weights(b)
    zeros = sum(int(((x[k] == 0) != (y[k] == 0)).sum()) for k in x)
    total = sum(x[k].numel() for k in x)
    largest = max(float((x[k].float() - y[k].float()).abs().max()) for k in x)
    return {"zero_pattern_diffs": zeros, "of": total, "max_weight_diff": largest}


def run_one(job: str, layout: str) -> dict:
    ranks, threads = LAYOUTS[layout]
    out, ckpt = scratch() / job / f"{layout}-results", checkpoint(job, layout)
    entry = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
             if ranks > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    m, start = machine(), time.perf_counter()
    proc = subprocess.run([*entry, str(ROOT / "main.py"), *JOBS[job], *COMMON, "--save", str(out),
                           "--save_model", str(ckpt)], capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{job} {layout} failed:\n{proc.stderr[-3000:]}")
    r = json.loads((out / "results.json").read_text())
    return {"job": job, "layout": layout, "ranks": ranks, "threads": threads,
            "ppl": r["perplexity"]["wiki-offline"]["ppl"], "achieved": r["sparsity"]["achieved"],
            "calib_dtype": r["settings"]["calib_dtype"],
            "time_s": {k: round(v, 1) for k, v in r["time_s"].items()},
            "wall_s": round(time.perf_counter() - start, 1), "machine": cpu_label(m), "date": m["date"],
            "shared_machine": "--shared-machine" in sys.argv}


def key(row: dict) -> tuple[str, str, str, bool]:
    """A cell: timed on a shared machine or not are two cells (an idle rerun keeps the shared row)."""
    return row["job"], row["layout"], row["machine"], row["shared_machine"]


def sweep() -> None:
    here, shared = cpu_label(machine()), "--shared-machine" in sys.argv
    done, only = finished(RUNS, key), parse_only(sys.argv)
    for job in JOBS:
        for layout in LAYOUTS:
            if (job, layout, here, shared) in done or (only is not None and job not in only):
                continue
            row = run_one(job, layout)
            if layout in COMPARE and checkpoint(job, COMPARE[layout]).exists():
                row["compared_with"] = COMPARE[layout]
                row.update(compare(checkpoint(job, layout), checkpoint(job, COMPARE[layout])))
            append(RUNS, row)


def report() -> None:
    rows = finished(RUNS, key)
    lines = ["# Two ranks against one process (torchrun, gloo, CPU)", "",
             "SmolLM2-135M, fp32 weights and calibration forwards, 32 × 512 calibration windows of "
             "wiki-offline (seed 0), perplexity on 16 × 2048 tokens of the held-out split in fp32. The rows "
             "of one job differ only in the layout (ranks × threads per process) on the same 2 cores. "
             "Weights are compared tensor by tensor with the layout named. Script: "
             "`benchmark/bench_distributed.py`.",
             ""]
    for cpu in sorted({r["machine"] for r in rows.values()}):
        lines += [f"CPU: {cpu}", "",
                  "| job | layout (ranks × threads) | perplexity | prune s | evaluate s | compared with "
                  "| zero-pattern diffs | max weight diff | timed idle |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for job in JOBS:
            for layout, shared in ((layout, shared) for shared in (False, True) for layout in LAYOUTS):
                r = rows.get((job, layout, cpu, shared))
                if r is None:
                    continue
                diffs = (f"{r['zero_pattern_diffs']:,} ({100 * r['zero_pattern_diffs'] / r['of']:.1f}%) | "
                         f"{r['max_weight_diff']:.3g}") if "compared_with" in r else " | "
                lines.append(f"| {job} | {r['ranks']} × {r['threads']} | {r['ppl']:.3f} | "
                             f"{r['time_s'].get('prune', 0):.0f} | {r['time_s'].get('evaluate', 0):.0f} | "
                             f"{r.get('compared_with', '—').replace('x', ' × ')} | {diffs} | "
                             f"{'no' if r['shared_machine'] else 'yes'} |")
        lines.append("")
    write("distributed", "\n".join(lines + notes("distributed")) + "\n", {"runs": list(rows.values())})


if __name__ == "__main__":
    if "--report" not in sys.argv:
        sweep()
    report()
