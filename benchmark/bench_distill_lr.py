"""The distillation learning rate, chosen on windows that no step of any compared run trained on or took
statistics from (``data.draw_windows``' ``selection`` role).

The recipe is `recover.md`'s best 50% row: ALPS with SparseGPT's searched 50% map, layer reconstruction
(20 steps, lr 5e-4, batch 8), then 100 distillation steps × 2 windows on the 64 distillation windows, keeping
the best state on the 8 held-out ones; SmolLM2-135M, 32 × 512 calibration windows of wiki-offline, seed 0,
sequential statistics, fp32 weights and forwards. The pruned and reconstructed model is built once (by the
pipeline, saved) and every learning rate distils a fresh copy of it with the pipeline's own windows and
``recover.distill``, so the candidates differ in the learning rate alone.

Two perplexities per candidate: ``selection_ppl`` on 8 × 512 selection windows drawn after the largest
distillation any recovery job runs (32 statistics + 128 + 16 distillation windows: disjoint from all of
them), the only number the choice reads; and ``ppl`` on the first 16 × 2048 windows of the wiki-offline eval
split, reported, never chosen on. Before 2026-12-04 the choice read 8 windows right after the statistics
windows: the first 8 of the 64 that distillation trains on.

    python benchmark/bench_distill_lr.py              # resumes from results/distill_lr_runs.jsonl
    python benchmark/bench_distill_lr.py --report     # only rebuild results/distill_lr.md
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append, cpu_label, finished, machine, notes, write  # noqa: E402

RUNS = RESULTS / "distill_lr_runs.jsonl"
SETTINGS = dict(nsamples=32, seqlen=512, eval_windows=16, seed=0, calib_dtype="float32")
PRUNING = dict(prune_method="alps", sparsity_ratio=0.5,
               allocation_file=str(RESULTS / "maps" / "sparsegpt-search-0.5.json"),
               reconstruct="layer", reconstruct_steps=20, reconstruct_lr=5e-4)
STEPS, BATCH, WINDOWS = 100, 2, 64
LRS = (1e-4, 5e-5, 1e-5)  # the two that were compared first, then the default
# the most windows any bench_recover job draws before the selection role (DISTILL_200: 128 + 16 held out)
RESERVED = {"statistics": 32, "distill": 128, "distill_held_out": 16}


def selection_windows(tokenizer):
    from mosaic.data import draw_windows

    return draw_windows(tokenizer, "wiki-offline", SETTINGS["seqlen"], SETTINGS["seed"],
                        {**RESERVED, "selection": 8})["selection"]


def selection_ppl(model, windows) -> float:
    import torch

    nll = 0.0
    with torch.no_grad():
        for w in windows:
            nll += float(model(input_ids=w[None], labels=w[None]).loss)
    return math.exp(nll / len(windows))


def eval_ppl(model, adapter, tokenizer) -> float:
    from mosaic.data import eval_tokens
    from mosaic.eval.perplexity import perplexity

    ids = eval_tokens(tokenizer, "wiki-offline")
    return perplexity(model, adapter, ids, 2048, SETTINGS["eval_windows"], 1, desc="ppl wiki-offline")["ppl"]


def build(directory: Path) -> dict:
    """The pruned, reconstructed model (no distillation), saved in ``directory``; its own row."""
    from mosaic.pipeline import Options, run

    start = time.perf_counter()
    r = run(Options(**SETTINGS, **PRUNING, save_model=str(directory)))
    return {"ppl": r["perplexity"]["wiki-offline"]["ppl"], "time_s": r["time_s"],
            "wall_s": round(time.perf_counter() - start, 1)}


def distil(directory: Path, lr: float) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from mosaic import recover
    from mosaic.adapter import adapter_for
    from mosaic.data import draw_windows
    from mosaic.load import load_model

    dense = load_model(dtype="float32", device="cpu")
    teacher, tokenizer = recover.teacher_copy(dense.model), dense.tokenizer
    student = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    student.config.use_cache = False
    adapter = adapter_for(student)
    held = max(2, WINDOWS // 8)  # as options.distill_split
    roles = draw_windows(tokenizer, "wiki-offline", SETTINGS["seqlen"], SETTINGS["seed"],
                         {"statistics": SETTINGS["nsamples"], "distill": WINDOWS, "distill_held_out": held})
    d = recover.distill(student, teacher, adapter, roles["distill"], roles["distill_held_out"],
                        recover.DistillSpec(steps=STEPS, lr=lr, batch=BATCH, seed=SETTINGS["seed"]))
    del teacher, dense
    return {"selection_ppl": selection_ppl(student, selection_windows(tokenizer)),
            "ppl": eval_ppl(student, adapter, tokenizer),
            "distill": {k: d[k] for k in ("steps", "lr", "batch", "best_step", "held_out_kl_before",
                                          "held_out_kl_after", "seconds")}}


def key(row: dict) -> tuple[str, str]:
    return row["name"], row["machine"]


def sweep() -> None:
    m = machine()
    here = cpu_label(m)
    done = finished(RUNS, key)
    shared = "--shared-machine" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "recon"
        built = build(directory)
        if ("recon", here) not in done:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(directory).eval()
            row = {"name": "recon", "lr": None, "ppl": built["ppl"],
                   "selection_ppl": selection_ppl(model, selection_windows(AutoTokenizer.from_pretrained(
                       directory))), "time_s": built["time_s"]}
            append(RUNS, {**row, "machine": here, "date": m["date"], "shared_machine": shared})
        for lr in LRS:
            name = f"recon+distill{STEPS}-lr{lr:g}"
            if (name, here) in done:
                continue
            start = time.perf_counter()
            row = {"name": name, "lr": lr, **distil(directory, lr)}
            append(RUNS, {**row, "wall_s": round(time.perf_counter() - start, 1), "machine": here,
                          "date": m["date"], "shared_machine": shared})


def report() -> None:
    rows = finished(RUNS, key)
    lines = ["# Distillation learning rate, chosen on selection windows", "",
             "ALPS with SparseGPT's searched 50% map + layer reconstruction (20 steps, lr 5e-4), then "
             f"{STEPS} distillation steps × {BATCH} windows on {WINDOWS} distillation windows (best state on "
             f"{max(2, WINDOWS // 8)} held out); SmolLM2-135M, 32 × 512 calibration windows of wiki-offline "
             "(seed 0), sequential statistics, fp32 weights and fp32 calibration forwards. Only the "
             "learning rate differs. `selection ppl`: 8 × 512 calibration-split windows disjoint from "
             "every statistics, distillation and held-out window of any recovery job (the choice reads "
             "this alone); `eval ppl`: the first 16 × 2048 windows of the wiki-offline eval split "
             "(reported, not chosen on). Produced by `python benchmark/bench_distill_lr.py`.", ""]
    for cpu in sorted({c for _, c in rows}):
        mine = [r for (_, c), r in rows.items() if c == cpu]
        candidates = [r for r in mine if r["lr"] is not None]
        best = min(candidates, key=lambda r: r["selection_ppl"]) if candidates else None
        lines += [f"CPU: {cpu}", "",
                  "| recovery | distill lr | selection ppl | eval ppl | best step | distill s |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(mine, key=lambda r: -(r["lr"] or 1)):
            d = r.get("distill") or {}
            mark = " **(chosen)**" if r is best else ""
            lines.append(f"| {r['name']}{mark} | {r['lr'] if r['lr'] is not None else '—'} | "
                         f"{r['selection_ppl']:.2f} | {r['ppl']:.2f} | {d.get('best_step', '—')} | "
                         f"{d.get('seconds', 0):.0f}{'‡' if r.get('shared_machine') else ''} |")
        missing = [f"lr {lr:g}" for lr in LRS if not any(r["lr"] == lr for r in candidates)]
        if missing:
            lines += ["", f"**Not measured (yet)**: {', '.join(missing)}; the sweep resumes from "
                      f"`results/{RUNS.name}`."]
        lines.append("")
    lines.append("‡: another job shared the 2 cores, so the time is not an idle figure.")
    write("distill_lr", "\n".join(lines + notes("distill_lr")) + "\n", {"runs": list(rows.values())})


if __name__ == "__main__":
    if "--report" not in sys.argv:
        sweep()
    report()
