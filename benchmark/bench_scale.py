"""Scale: in-memory vs streamed (--offload disk) pruning of random-weight LLaMA-shaped models.

For each size a random fp32 checkpoint is written shard by shard (never whole in memory), then
SparseGPT 50% from 16×512 calibration runs twice under /usr/bin/time -v: in memory (--offload none)
and streamed (--offload disk). Reported: peak RSS, wall time, pruning time per layer, seconds per
billion parameters, and the streamed peak against one layer + the embedding + the activations.

    python benchmark/bench_scale.py                       # all sizes (needs ~60 GB RAM and disk for 3b)
    python benchmark/bench_scale.py --sizes 135m --nsamples 4 --seqlen 128 --out /tmp/scale   # a trial

``--peak`` measures only the streamed run's peak RSS over the bare-import baseline, as a share of the
checkpoint's bytes (issue 20: Wanda 50%, 4 × 128 on the 0.55B shape), prints it and writes nothing:

    python benchmark/bench_scale.py --peak --sizes 500m --method wanda --nsamples 4 --seqlen 128 --runs 2
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.common import RESULTS, ROOT, machine, machine_line  # noqa: E402

# name -> (hidden, intermediate, layers, heads, kv heads); vocabulary 49152 (SmolLM2's tokenizer), untied head
SIZES = {
    "135m": (576, 1536, 30, 9, 3),
    "500m": (1536, 4096, 16, 12, 4),
    "1.1b": (2048, 5632, 22, 32, 4),
    "3b": (3200, 8640, 26, 32, 32),
}
VOCAB = 49152


def config_for(name: str):
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv = SIZES[name]
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                       max_position_embeddings=2048,
                       tie_word_embeddings=name == "135m", bos_token_id=1, eos_token_id=2)


def make_checkpoint(name: str, directory: Path, seed: int = 0) -> dict:
    """A random fp32 checkpoint, one shard per part (embedding, each layer, head), with an index."""
    from transformers import AutoTokenizer

    from mosaic.load import resolve_model
    from mosaic.shards import shard_name, write_index, write_shard
    from mosaic.stream import Streamed, skeleton

    directory.mkdir(parents=True, exist_ok=True)
    config_for(name).save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m", str(ROOT / "llm_weights")))
    tokenizer.save_pretrained(directory)
    model = skeleton(str(directory), torch.float32)
    s = Streamed(model, None, torch.float32)
    parts = ["embed", *range(s.n_layers), "head"]
    gen = torch.Generator().manual_seed(seed)
    shapes = {n: t.shape for n, t in model.state_dict().items()}
    largest = 0
    for k, part in enumerate(parts):
        tensors = {}
        for n in s.saved_names(part):
            shape = shapes[n]
            tensors[n] = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
        write_shard(directory / shard_name(k, len(parts)), tensors)
        if isinstance(part, int):
            largest = max(largest, sum(t.numel() * 4 for t in tensors.values()))
        del tensors
    index = write_index(directory, [shard_name(k, len(parts)) for k in range(len(parts))])
    embed = shapes["model.embed_tokens.weight"].numel() * 4
    return {"params": index["metadata"]["total_parameters"], "bytes": index["metadata"]["total_size"],
            "largest_layer_bytes": largest, "embedding_bytes": embed, "layers": s.n_layers,
            "hidden": SIZES[name][0]}


def baseline_rss_gib() -> float:
    """Peak RSS of a process that only imports what main.py does (torch, transformers, datasets, mosaic)."""
    code = ("import datasets, transformers, mosaic.pipeline, mosaic.stream; "
            "from transformers import LlamaForCausalLM")
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT)
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 2**20


def timed_run(model: Path, offload: str, out: Path, nsamples: int, seqlen: int, batch: int,
              method: str = "sparsegpt") -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, str(ROOT / "main.py"), "--model", str(model),
           "--prune_method", method, "--sparsity_ratio", "0.5", "--nsamples", str(nsamples),
           "--seqlen", str(seqlen), "--calib_batch_size", str(batch), "--eval_datasets", "none",
           "--offload", offload, "--save_model", str(out / "model"), "--save", str(out / "run"),
           "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{offload} run failed:\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    results = json.loads((out / "run" / "results.json").read_text())
    shutil.rmtree(out / "model", ignore_errors=True)
    return {"peak_rss_gib": rss_kb / 2**20, "wall_s": wall, "time_s": results["time_s"],
            "streamed": "streaming" in results, "achieved": results["sparsity"]["achieved"]}


def table(rows: list[dict], args) -> str:
    lines = [
        "# Scale: pruning in memory vs streamed from disk (`--offload disk`)",
        "",
        f"SparseGPT 50% unstructured, {args.nsamples}×{args.seqlen} calibration (batch {args.batch}), fp32 "
        "random-weight LLaMA-shaped checkpoints written in one shard per layer; `/usr/bin/time -v` peak RSS "
        "and wall time of `main.py` (load, calibration, pruning, save; no evaluation). *Bound* = largest "
        "layer + embedding + calibration activations (fp32) + the RSS of a process that only imports the "
        f"libraries ({rows[0]['baseline_gib']:.2f} GiB here); the streamed target is ≤ 1.5× bound. *Working "
        "set* adds what the bound leaves out but a SparseGPT layer turn holds at its peak (the down_proj "
        "stage): the Hessian and its inverse factor (2 × intermediate² fp32), every batch's paused MLP "
        "intermediate (nsamples × seqlen × intermediate) and one batch's gate/up temporaries (3 × batch × "
        "seqlen × intermediate).",
        "",
        f"Machine: {machine_line(machine())}",
        "",
        "| model | params | layers | mode | peak RSS GiB | bound GiB | RSS / bound | working set GiB | "
        "RSS / working set | wall s | prune s/layer | s per B params | streamed/in-memory wall | "
        "streamed/in-memory RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for mode in ("memory", "disk"):
            m = r[mode]
            ratios = (f"{r['disk']['wall_s'] / r['memory']['wall_s']:.2f} | "
                      f"{r['disk']['peak_rss_gib'] / r['memory']['peak_rss_gib']:.2f}"
                      if mode == "disk" else " | ")
            inter = SIZES[r["name"]][1]
            working = r["bound_gib"] + (2 * inter * inter * 4
                                        + (args.nsamples + 3 * min(args.batch, args.nsamples))
                                        * args.seqlen * inter * 4) / 2**30
            lines.append(
                f"| {r['name']} | {r['params'] / 1e9:.3f} B | {r['layers']} | "
                f"{'in memory' if mode == 'memory' else 'streamed'} | {m['peak_rss_gib']:.2f} | "
                f"{r['bound_gib']:.2f} | {m['peak_rss_gib'] / r['bound_gib']:.2f} | {working:.2f} | "
                f"{m['peak_rss_gib'] / working:.2f} | {m['wall_s']:.1f} "
                f"| {m['time_s'].get('prune', 0) / r['layers']:.2f} | "
                f"{m['wall_s'] / (r['params'] / 1e9):.1f} | {ratios} |")
    lines += ["", "Targets (issue 12): streamed peak RSS ≤ 1.5× bound and ≤ 30% of the in-memory peak at 3B; "
              "streamed wall ≤ 1.3× in memory.", ""]
    run_here = [r["name"] for r in rows]  # in SIZES order
    if run_here != list(SIZES) or (args.nsamples, args.seqlen) != (16, 512):
        lines += [f"**A trial, not the sweep**: sizes {', '.join(run_here)} with "
                  f"{args.nsamples}×{args.seqlen} calibration only. At this size the streamed peak is "
                  "dominated by fixed costs the bound leaves out (the calibration text and its tokenization, "
                  "≈0.2 GiB, and the embedding held during capture), which do not grow with the model. The "
                  "full sweep is `python benchmark/bench_scale.py` on an idle machine (≈60 GB RAM and disk "
                  "for 3b).", ""]
    notes = RESULTS / "scale_notes.md"
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    params = [r["params"] / 1e9 for r in rows]
    for mode, label in (("memory", "in memory"), ("disk", "streamed")):
        a.plot(params, [r[mode]["peak_rss_gib"] for r in rows], "o-", label=label)
        b.plot(params, [r[mode]["wall_s"] for r in rows], "o-", label=label)
    a.plot(params, [r["bound_gib"] for r in rows], "kx--", label="layer + embedding + activations")
    a.set(xlabel="parameters (B)", ylabel="peak RSS (GiB)", title="memory")
    b.set(xlabel="parameters (B)", ylabel="wall time (s)", title="time")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def streamed_peak(name: str, work: Path, args) -> dict:
    """Peak RSS of ``args.runs`` streamed runs over the bare-import baseline, and as a share of the
    checkpoint's bytes. A checkpoint already in ``work`` is reused."""
    model = work / f"llama-{name}"
    if not (model / "model.safetensors.index.json").is_file():
        make_checkpoint(name, model)
    size = json.loads((model / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    baseline = baseline_rss_gib()
    peaks = [timed_run(model, "disk", work / f"out-{name}-peak", args.nsamples, args.seqlen, args.batch,
                       args.method)["peak_rss_gib"] for _ in range(args.runs)]
    return {"name": name, "method": args.method, "nsamples": args.nsamples, "seqlen": args.seqlen,
            "model_gib": size / 2**30, "baseline_gib": baseline, "peak_gib": peaks,
            "over_baseline_share": [(p - baseline) * 2**30 / size for p in peaks], "machine": machine()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma list of {', '.join(SIZES)}")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="--calib_batch_size")
    p.add_argument("--work", default=None, help="where the checkpoints go (default: a temporary directory)")
    p.add_argument("--out", default=str(RESULTS), help="where scale.md/json/png go")
    p.add_argument("--peak", action="store_true",
                   help="only the streamed run's peak RSS over the bare-import baseline (printed; writes "
                        "nothing)")
    p.add_argument("--method", default="sparsegpt", help="--prune_method of --peak runs")
    p.add_argument("--runs", type=int, default=1, help="--peak runs per size, one at a time")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="mosaic-scale-"))
    if args.peak:
        for name in args.sizes.split(","):
            print(json.dumps(streamed_peak(name, work, args)), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, baseline = [], baseline_rss_gib()
    previous = json.loads((out / "scale.json").read_text()) if (out / "scale.json").exists() else {}
    before = previous.get("args", {})
    if (before.get("nsamples"), before.get("seqlen")) == (args.nsamples, args.seqlen):
        # resume: sizes already measured
        rows = [r for r in previous["rows"] if r["name"] in args.sizes.split(",")]
    for name in args.sizes.split(","):
        if any(r["name"] == name for r in rows):
            continue
        model = work / f"llama-{name}"
        info = make_checkpoint(name, model)
        acts = args.nsamples * args.seqlen * info["hidden"] * 4
        row = {"name": name, **info, "activation_bytes": acts, "baseline_gib": baseline,
               "bound_gib": baseline + (info["largest_layer_bytes"] + info["embedding_bytes"] + acts) / 2**30}
        for mode in ("memory", "disk"):
            row[mode] = timed_run(model, "none" if mode == "memory" else "disk", work / f"out-{name}-{mode}",
                                  args.nsamples, args.seqlen, args.batch)
            print(name, mode, json.dumps(row[mode]), flush=True)
        assert row["disk"]["streamed"] and not row["memory"]["streamed"]
        rows.append(row)
        rows.sort(key=lambda r: list(SIZES).index(r["name"]))
        shutil.rmtree(model, ignore_errors=True)
        (out / "scale.json").write_text(json.dumps({"machine": machine(), "args": vars(args), "rows": rows},
                                                   indent=1))
        (out / "scale.md").write_text(table(rows, args))
        plot(rows, out / "scale.png")
    print((out / "scale.md").read_text())


if __name__ == "__main__":
    main()
