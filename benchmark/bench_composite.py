"""Composite benchmark: what structured removal buys on SmolLM2-135M, measured.

Dense vs unstructured 50% vs composite (R = 0.2, 0.35, 0.5 at S = 0.5 and S = 0.7; R = S = 0.5 is pure
structured), all with ``sparsegpt_mosaic``: parameters, safetensors bytes, perplexity, and, per saved
checkpoint in a fresh process (benchmark/latency.py), prefill latency (1 × 512), decode tokens/s at
batch 1 and 8 (128 new tokens) and peak RSS, in fp32 and bf16 on the CPU.

    python benchmark/bench_composite.py       # ~25 min on 2 cores; run on an otherwise idle machine
    python benchmark/bench_composite.py --searched   # the "Searched widths" section only (rule vs search)

``--searched`` holds the kernel (SparseGPT), the calibration and the statistics fixed and changes only the
plan: the `mosaic` rule's widths against the searched ones (``--allocation search``) at S = R = 0.5. Each
job is kept in ``results/composite_search_runs.jsonl`` as it finishes (a rerun skips it), and the section is
rewritten in ``results/composite.md`` (the rest of the page is left as it is).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    ROOT,
    YARDSTICK,
    append,
    finished,
    machine,
    machine_line,
    run_main,
    write,
)

METHOD = "sparsegpt_mosaic"
NOTES = """
Notes:
- Speed follows the removed structure: decode at batch 1 is memory-bound on this CPU, so it scales with the
  bytes read per token (the untouched 28M-parameter embedding/LM head sets the floor); unstructured zeros
  give nothing (1.03×). Batch-8 decode is a single run each and varies by about ±10% between runs.
- At S = 0.5 unstructured alone keeps the best perplexity (27.4); composite R = 0.2 costs +2.8 ppl for a
  16% smaller checkpoint and 1.18× decode. At S = 0.7 composite R = 0.2 / 0.35 (ppl 104.5 / 100.9) beats
  unstructured `sparsegpt_mosaic` at 70% (157.7 in `allocation.md`, same settings) while also being
  16–28% smaller: removing whole low-energy units, with SparseGPT moving their contribution onto the kept
  columns, hurts less than spreading that many more zeros.
- Achieved total removal is S to within 0.001 for every row, and the structured share is R to within
  0.001 (widths rounded to multiples of 8).
"""
CONFIGS = [  # label, sparsity S, structured R (None: not composite)
    ("dense", 0.0, None),
    ("unstructured 50%", 0.5, None),
    ("composite S=0.5 R=0.2", 0.5, 0.2),
    ("composite S=0.5 R=0.35", 0.5, 0.35),
    ("structured S=R=0.5", 0.5, 0.5),
    ("composite S=0.7 R=0.2", 0.7, 0.2),
    ("composite S=0.7 R=0.35", 0.7, 0.35),
    ("composite S=0.7 R=0.5", 0.7, 0.5),
]


def latency(checkpoint: Path, dtype: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark" / "latency.py"), str(checkpoint),
                           "--dtype", dtype], capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    m = machine()
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        for label, sparsity, structured in CONFIGS:
            ckpt = Path(tmp) / label.replace(" ", "_").replace("%", "").replace("=", "")
            if structured is None:
                kind = ["--sparsity_type", "unstructured"]
            else:
                kind = ["--sparsity_type", "composite", "--structured_ratio", str(structured)]
            method = "dense" if sparsity == 0 else METHOD
            r = run_main(["--prune_method", method, "--sparsity_ratio", str(sparsity), *kind, *YARDSTICK,
                          "--eval_dtype", "bfloat16", "--save_model", str(ckpt)])
            row = {"label": label, "S": sparsity, "R": structured,
                   "ppl": r["perplexity"]["wiki-offline"]["ppl"], "params": r["parameters"]["after"]["total"],
                   "nonzero": r["parameters"]["after"]["nonzero"],
                   "disk_bytes": r["checkpoint"]["safetensors_bytes"], "prune_s": r["time_s"].get("prune"),
                   "achieved": r["sparsity"]["achieved"], "structured": r["sparsity"].get("structured", 0.0)}
            for dtype in ("float32", "bfloat16"):
                row[dtype] = latency(ckpt, dtype)
            rows.append(row)
            print(row, flush=True)
            for f in ckpt.glob("*.safetensors"):  # keep the disk free
                f.unlink()
    dense = rows[0]
    by = {r["label"]: r for r in rows}
    r50 = by["composite S=0.7 R=0.5"]
    best_05 = min((r for r in rows if r["S"] == 0.5 and r["R"] not in (None, 0.5)), key=lambda r: r["ppl"])
    checks = {
        "R=0.5 decodes ≥ 1.5× dense at batch 1, fp32 (got "
        f"{r50['float32']['decode_b1_tok_s'] / dense['float32']['decode_b1_tok_s']:.2f}×)":
            r50["float32"]["decode_b1_tok_s"] >= 1.5 * dense["float32"]["decode_b1_tok_s"],
        f"R=0.5 checkpoint ≤ 62% of dense bytes (got {r50['disk_bytes'] / dense['disk_bytes']:.1%})":
            r50["disk_bytes"] <= 0.62 * dense["disk_bytes"],
        f"S=0.5: best composite ({best_05['label']}, ppl {best_05['ppl']:.2f}) below pure structured "
        f"(ppl {by['structured S=R=0.5']['ppl']:.2f})": best_05["ppl"] < by["structured S=R=0.5"]["ppl"],
    }
    lines = ["# Composite benchmark: SmolLM2-135M, size and speed of structured removal", "",
             f"Machine: {machine_line(m)}.", "",
             f"Settings: `{METHOD}`, calibration 32 × 512 tokens of wiki-offline (seed 0), `--round_to 8`, "
             "sequential statistics for every row (`--calib_stats sequential`); perplexity on the first 16 "
             "windows × 2048 tokens of the held-out wiki-offline split (bf16 forwards). S = share of decoder "
             "projection weights removed in total, R = share removed structurally (heads and MLP channels); "
             "the tied 28M-parameter embedding is never pruned. Disk: the fp32 safetensors checkpoint. "
             "Latency: each checkpoint reloaded in a fresh process (`benchmark/latency.py`), torch CPU, 2 "
             "threads; prefill = one forward of 1 × 512 tokens (median of 3); decode = greedy `generate` of "
             "128 new tokens after a 32-token prompt (batch 1: median of 2; batch 8: one run), tokens/s over "
             "all sequences; peak RSS of that process (Python + torch + model). Produced by `python "
             "benchmark/bench_composite.py`.", "",
             "| model | params | disk (MB) | ppl | fp32 prefill (ms) | fp32 decode b1 (tok/s) | "
             "fp32 decode b8 | bf16 prefill (ms) | bf16 decode b1 | bf16 decode b8 | RSS fp32 (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, b = r["float32"], r["bfloat16"]
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.1f}M | {r['disk_bytes'] / 1e6:.0f} "
                     f"({r['disk_bytes'] / dense['disk_bytes']:.0%}) | {r['ppl']:.2f} | "
                     f"{f['prefill_512_ms']:.0f} | {f['decode_b1_tok_s']:.1f} "
                     f"({f['decode_b1_tok_s'] / dense['float32']['decode_b1_tok_s']:.2f}×) | "
                     f"{f['decode_b8_tok_s']:.1f} | {b['prefill_512_ms']:.0f} | {b['decode_b1_tok_s']:.1f} | "
                     f"{b['decode_b8_tok_s']:.1f} | {f['peak_rss_gib']:.2f} |")
    lines += ["", "Targets (issue 4):",
              *[f"- {k}: **{'met' if v else 'MISSED'}**" for k, v in checks.items()], NOTES]
    write("composite", "\n".join(lines), {"machine": m, "method": METHOD, "rows": rows,
                                          "checks": {k: bool(v) for k, v in checks.items()}})


SEARCHED_RUNS = RESULTS / "composite_search_runs.jsonl"
SEARCHED = [  # label, extra flags; both S = R = 0.5 with SparseGPT
    ("rule (mosaic)", ["--prune_method", "sparsegpt_mosaic"]),
    # no refinement: with it the job would not fit the hour run_main allows on the shared machine
    ("search", ["--prune_method", "sparsegpt", "--allocation", "search", "--search_budget", "0"]),
]


def searched() -> None:
    """Rule against searched widths at S = R = 0.5 (SparseGPT): perplexity, size and search time."""
    m = machine()
    done = finished(SEARCHED_RUNS, lambda r: r["label"])
    for label, flags in SEARCHED:
        if label in done:
            continue
        r = run_main([*flags, "--sparsity_type", "composite", "--sparsity_ratio", "0.5", "--structured_ratio",
                      "0.5", *YARDSTICK, "--eval_dtype", "bfloat16"])
        c = r["composite"]
        append(SEARCHED_RUNS, {
            "label": label, "machine": m, "ppl": r["perplexity"]["wiki-offline"]["ppl"],
            "params": r["parameters"]["after"]["total"], "achieved": r["sparsity"]["achieved"],
            "structured": r["sparsity"]["structured"], "removed": c["params_before"] - c["params_kept"],
            "calib_dtype": r["settings"]["calib_dtype"], "time_s": r["time_s"],
            "widths": [[w["heads"], w["kv_heads"], w["intermediate"]] for w in c["layers"]],
            "search": {k: v for k, v in c.get("search", {}).items()
                       if k in ("chosen", "kl", "predicted_kl", "evolution")}})
    rows = finished(SEARCHED_RUNS, lambda r: r["label"])
    section = ["## Searched widths", ""]
    if len(rows) < len(SEARCHED):
        section.append("Not measured yet: " + ", ".join(k for k, _ in SEARCHED if k not in rows) + ".")
    else:
        rule, search = rows["rule (mosaic)"], rows["search"]
        mm = search["machine"]
        section += [
            f"Machine: {machine_line(mm)}; **shared** with two other engineers' jobs while measuring (load "
            "average 5–7 on 2 cores), so the times are not idle figures.", "",
            "Settings: SparseGPT, S = R = 0.5 (`--sparsity_type composite --sparsity_ratio 0.5 "
            f"--structured_ratio 0.5`), calibration 32 × 512 tokens of wiki-offline (seed 0), "
            f"{search['calib_dtype']} calibration forwards, sequential statistics, `--round_to 8`; "
            "perplexity on the first 16 windows × 2048 tokens of the held-out wiki-offline split (bf16 "
            "forwards). Held "
            "fixed: the kernel, the calibration and the statistics; only the plan differs: the `mosaic` "
            "rule's widths (`sparsegpt_mosaic`) against the searched ones (`sparsegpt --allocation search`, "
            "8 Fisher windows and 8 held-out windows, `--search_budget 0`: no refinement, which was not "
            "measured here). Produced by `python "
            "benchmark/bench_composite.py --searched`.", "",
            "| plan | params | structured removed | ppl | held-out KL (search windows, from the search job's "
            "guard) | search (s) | whole job (s) |", "|---|---|---|---|---|---|---|"]
        kl = search["search"]["kl"]
        for row, name in ((rule, "rule"), (search, "search")):
            t = row["time_s"]
            search_s = f"{t['search']:.0f}" if "search" in t else "—"
            section.append(f"| {row['label']} | {row['params'] / 1e6:.1f}M | {row['removed']:,} "
                           f"({row['structured']:.2%}) | {row['ppl']:.2f} | {kl[name]:.4f} | {search_s} | "
                           f"{sum(t.values()):.0f} |")
        change = search["ppl"] / rule["ppl"] - 1
        most = max(h for h, _, _ in search["widths"])
        full = ", ".join(str(i) for i, (h, _, _) in enumerate(search["widths"]) if h == most)
        widths = [c for _, _, c in search["widths"]]
        section += ["", f"The search kept the **{search['search']['chosen']}** plan; perplexity "
                    f"{change:+.1%} against the rule's, with exactly the same number of parameters removed "
                    "(so the same "
                    "checkpoint size). Searched widths per layer (query heads / KV heads / MLP channels): "
                    + ", ".join(f"{h}/{k}/{c}" for h, k, c in search["widths"]) + "; the rule's: "
                    + ", ".join(f"{h}/{k}/{c}" for h, k, c in rule["widths"]) + ".",
                    "", f"Issue 40's quality target (≥ 30% lower perplexity than the rule's before recovery) "
                    f"is {'met' if change <= -0.30 else 'MISSED'} on this run ({change:+.1%}). The searched "
                    f"plan keeps the most query heads ({most}) in layers {full} and MLP widths from "
                    f"{min(widths)} to {max(widths)} channels (the rule's: "
                    f"{min(w[2] for w in rule['widths'])} to {max(w[2] for w in rule['widths'])}). "
                    "Not measured here: "
                    "the refinement (16 generations would not fit the shared machine's time), ALPS, S = 0.5 "
                    "with R = 0.35, batch-1/8 decode speed of the searched checkpoint (same parameter count, "
                    "other per-layer widths), recovery after the searched plan, and an idle search time."]
    path = RESULTS / "composite.md"
    text = path.read_text()
    head = text.split("\n## Searched widths\n")[0].rstrip("\n")
    path.write_text(head + "\n\n" + "\n".join(section) + "\n")
    print("\n".join(section))


if __name__ == "__main__":
    searched() if "--searched" in sys.argv[1:] else main()
