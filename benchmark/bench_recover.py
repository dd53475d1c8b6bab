"""Recovery after pruning on SmolLM2-135M: perplexity without recovery, with layer-wise reconstruction, and
with reconstruction + distillation, and the time of each phase.

Within a row only the recovery differs: the same kernel, allocation, 32 × 512 calibration windows of
wiki-offline (seed 0), sequential statistics and fp32 weights; the calibration forwards in the dtype
``--calib_dtype auto`` resolved to on the row's CPU (``calib_dtype_of``). Two perplexities per job:
  - ``ppl``: the first 16 windows × 2048 tokens of the held-out wiki-offline *eval* split (the table);
  - ``selection_ppl``: 8 windows × 512 tokens of the *calibration* split that share no token with any
    statistics, distillation or held-out window of any job here: the only number knobs are chosen on
    (rows from before 2026-12-04 carry ``calib_ppl`` instead, on windows distillation trained on).
Finished jobs are kept in ``results/recover_runs.jsonl``, so an interrupted sweep resumes.

    python benchmark/bench_recover.py                 # the table's jobs, most informative first
    python benchmark/bench_recover.py --tune          # the knob sweep on calibration text
    python benchmark/bench_recover.py --only=NAME,..  # some jobs
    python benchmark/bench_recover.py --report        # only rebuild the table
    python benchmark/bench_recover.py --zero-shot     # dense + best 50%/70% rows, lm-eval at limit 500
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from operator import itemgetter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    OLD_CPU,
    RESULTS,
    append,
    cpu_label,
    cpu_letters,
    finished,
    machine,
    machine_line,
    not_measured,
    notes,
    parse_only,
    write,
)

RUNS = RESULTS / "recover_runs.jsonl"
SETTINGS = dict(nsamples=32, seqlen=512, eval_windows=16, seed=0)
SHARED_MACHINE = "--shared-machine" in sys.argv  # other jobs ran on the same cores: times aren't idle figures
NAME = itemgetter("name")  # a finished job's cell: pruning/recovery
def cpu_of(row: dict) -> str:
    return row.get("machine", OLD_CPU)


def calib_dtype_of(row: dict) -> str:
    """The calibration forwards' dtype of a row: recorded since 2026-12-04; before, ``--calib_dtype auto``
    meant bf16 on a CPU with native bf16 (B) and fp32 elsewhere (A), unless the job set it."""
    if "calib_dtype" in row:
        return row["calib_dtype"]
    if "calib_dtype" in row.get("options", {}):
        return row["options"]["calib_dtype"]
    cpu = cpu_of(row)
    return "bfloat16" if "native bf16" in cpu and "no native bf16" not in cpu else "float32"


def base(method: str, s: float, kind: str = "unstructured", **kw) -> dict:
    return dict(prune_method=method, sparsity_ratio=s, sparsity_type=kind, **kw)


# the defaults of --reconstruct_steps/_batch and the lr that was the default until 2026-12-04 (pinned, so
# that every row reproduces; the default is now 1e-3: RECON_HOT)
RECON = dict(reconstruct="layer", reconstruct_steps=20, reconstruct_lr=5e-4)
# a CPU-sized budget: 20 AdamW steps of 2 × 512-token windows (default lr), ~10 minutes on 2 cores
DISTILL = dict(distill_steps=20, distill_batch=2)
MAPS = RESULTS / "maps"  # the search rows' maps (from search_runs.jsonl), applied as --allocation_file


def searched(method: str, s: float, map_of: str | None = None) -> dict:
    """The kernel with the map the search of ``map_of`` (default: the kernel itself) found in
    ``bench_search.py`` (the search is not run again: for ALPS it took 1.7 hours). Re-applying a map
    reproduces the search run's pruning bit for bit on the same CPU and calibration dtype; on another, the
    calibration forwards' precision (bf16 on the AVX-512 EPYC, fp32 in the search) and rounding move it
    (ALPS 70%: 58.20 on the AVX-512 EPYC, 56.87 in the search)."""
    return base(method, s, allocation_file=str(MAPS / f"{map_of or method}-search-{s}.json"))

# name -> options; "none" / "recon" / "recon+distill" variants of each pruning
PRUNINGS = {
    "sparsegpt-uniform-0.7": base("sparsegpt", 0.7),
    "alps-uniform-0.7": base("alps", 0.7),
    "sparsegpt-uniform-0.5": base("sparsegpt", 0.5),
    "sparsegpt-uniform-2:4": base("sparsegpt", 0.5, "2:4"),
    "sparsegpt-composite-0.5-0.5": base("sparsegpt_mosaic", 0.5, "composite", structured_ratio=0.5),
    "sparsegpt-composite-0.5-0.35": base("sparsegpt_mosaic", 0.5, "composite", structured_ratio=0.35),
    "alps-uniform-0.5": base("alps", 0.5),
    "sparsegpt-uniform-0.8": base("sparsegpt", 0.8),
    "alps-uniform-0.8": base("alps", 0.8),
    "alps-search-0.7": searched("alps", 0.7),
    "sparsegpt-search-0.7": searched("sparsegpt", 0.7),
    "sparsegpt-search-0.5": searched("sparsegpt", 0.5),
    # ALPS with the map SparseGPT's search found at 50% (ALPS has no searched 50% map: its search takes
    # hours on this CPU); the map is fixed, so against alps-uniform-0.5 only the allocation differs
    "alps-sgmap-0.5": searched("alps", 0.5, map_of="sparsegpt"),
}
# a 5× distillation budget (100 steps × 2 windows, ~30 minutes here): 20 steps always ended at their best
DISTILL_LONG = dict(distill_steps=100, distill_batch=2)
# and the same budget at a 5× peak learning rate (chosen against 1e-5 on calib ppl, which for distillation
# rows were training windows; re-checked on selection windows by bench_distill_lr.py: 1e-4 > 5e-5 stands)
DISTILL_LONG_HOT = {**DISTILL_LONG, "distill_lr": 5e-5}
# 5e-5 beat 1e-5 on calib ppl with the held-out KL still falling at the last step: one more doubling
DISTILL_LONG_HOTTER = {**DISTILL_LONG, "distill_lr": 1e-4}
# twice the reconstruction learning rate at the same 20 steps (the same time): tried on ALPS 70%, where
# 5e-4 left the -40% target short; it won on calib ppl there and on SparseGPT 70% (the knob sweep), so it
# is now the --reconstruct_lr default
RECON_HOT = {**RECON, "reconstruct_lr": 1e-3}
# twice the steps on twice the windows (128: 200 steps x 2 windows would see 64 windows ~6 times), for
# composite S = R = 0.5, whose held-out KL was still falling at step 100 of 100
DISTILL_200 = dict(distill_steps=200, distill_batch=2, distill_windows=128, distill_lr=1e-4)
# the reconstruction shrunk toward the kernel's weights until no guard text (the calibration texts, code and
# exam questions, their calibration-side windows) is worse: issue 38's "recovery never makes a text worse"
GUARD = dict(recovery_guard="auto")
VARIANTS = {"none": {}, "recon": RECON, "recon-lr1e-3": RECON_HOT, "recon+distill": {**RECON, **DISTILL},
            "recon-guard": {**RECON, **GUARD}, "recon-guard+distill": {**RECON, **GUARD, **DISTILL},
            "recon+distill100": {**RECON, **DISTILL_LONG},
            "recon+distill100-lr5e-5": {**RECON, **DISTILL_LONG_HOT},
            "recon+distill100-lr1e-4": {**RECON, **DISTILL_LONG_HOTTER},
            "recon-lr1e-3+distill100-lr1e-4": {**RECON_HOT, **DISTILL_LONG_HOTTER},
            "recon-lr1e-3+distill200-w128-lr1e-4": {**RECON_HOT, **DISTILL_200}}
# in the order they ran; a pruning added to PRUNINGS joins the [6:] slice, so duplicates are dropped here
# (a job listed twice would run twice: sweep() reads the finished jobs once, before the loop)
JOBS = [(p, v) for v in ("none", "recon") for p in list(PRUNINGS)[:2]] + \
       [(p, v) for p in list(PRUNINGS)[2:6] for v in ("none", "recon")] + \
       [(p, "recon+distill") for p in list(PRUNINGS)[:2]] + \
       [(p, v) for p in list(PRUNINGS)[6:] for v in ("none", "recon")] + \
       [(p, "recon+distill") for p in ("alps-search-0.7", "sparsegpt-search-0.5",
                                       "sparsegpt-composite-0.5-0.5")] + \
       [(p, "recon+distill100") for p in ("sparsegpt-search-0.5", "alps-sgmap-0.5")] + \
       [("alps-sgmap-0.5", "recon+distill100-lr5e-5"), ("alps-sgmap-0.5", "recon+distill100-lr1e-4")] + \
       [("alps-uniform-0.7", "recon-lr1e-3"),
        ("sparsegpt-composite-0.5-0.5", "recon-lr1e-3+distill100-lr1e-4"),
        ("sparsegpt-composite-0.5-0.5", "recon-lr1e-3+distill200-w128-lr1e-4")] + \
       [(p, "recon+distill") for p in ("sparsegpt-search-0.7", "sparsegpt-uniform-2:4",
                                       "sparsegpt-composite-0.5-0.35", "alps-uniform-0.5",
                                       "sparsegpt-uniform-0.5", "sparsegpt-uniform-0.8", "alps-uniform-0.8")]
JOBS = list(dict.fromkeys(JOBS))

# zero-shot (--zero-shot): dense and the best 50% / 70% pipelines: none, reconstruction, and distillation
ZS_TASKS, ZS_LIMIT = "arc_easy,hellaswag,piqa,winogrande", 500
ZS = dict(eval_zero_shot=ZS_TASKS, zs_limit=ZS_LIMIT)
ZS_JOBS = ["dense", "alps-search-0.7/recon", "sparsegpt-search-0.5/recon", "alps-search-0.7/none",
           "sparsegpt-search-0.5/none", "alps-search-0.7/recon+distill",
           "alps-sgmap-0.5/recon+distill100-lr1e-4"]

# knob sweep on calibration text (SparseGPT 70% uniform)
TUNE = {
    "tune-layer-20-5e-4": dict(reconstruct="layer", reconstruct_steps=20, reconstruct_lr=5e-4),
    "tune-sublayer-20-5e-4": dict(reconstruct="sublayer", reconstruct_steps=20, reconstruct_lr=5e-4),
    "tune-sublayer-20-1e-3": dict(reconstruct="sublayer", reconstruct_steps=20, reconstruct_lr=1e-3),
    "tune-sublayer-40-5e-4": dict(reconstruct="sublayer", reconstruct_steps=40, reconstruct_lr=5e-4),
    "tune-sublayer-20-2e-4": dict(reconstruct="sublayer", reconstruct_steps=20, reconstruct_lr=2e-4),
    # twice the default lr, after it won on ALPS 70% (calib 69.63 vs 70.63): does it win here too?
    "tune-layer-20-1e-3": dict(reconstruct="layer", reconstruct_steps=20, reconstruct_lr=1e-3),
    # what else moves: the layer's two RMSNorm scales as well (SmolLM2 has no biases)
    "tune-layer-norms-20-5e-4": dict(reconstruct="layer", reconstruct_steps=20, reconstruct_lr=5e-4,
                                     reconstruct_norms=True),
}


def selection_ppl(model_dir: Path, calib: str = "wiki-offline") -> float:
    """Perplexity on 8 × 512 ``selection`` windows of ``calib`` (a text or a mixture): drawn
    (``data.draw_windows``) after the statistics windows and the largest distillation any job here runs
    (128 + 16), so no job trained on them or took statistics from them. (Until 2026-12-04 this read the 8
    windows right after the statistics windows, the first 8 that distillation trains on: the rows'
    ``calib_ppl``.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mosaic.data import draw_windows

    tok = AutoTokenizer.from_pretrained(model_dir)
    windows = draw_windows(tok, calib, SETTINGS["seqlen"], SETTINGS["seed"],
                           {"statistics": SETTINGS["nsamples"], "distill": 128, "distill_held_out": 16,
                            "selection": 8})["selection"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll = 0.0
    with torch.no_grad():
        for w in windows:
            nll += float(model(input_ids=w[None], labels=w[None]).loss)
    return math.exp(nll / len(windows))


def knob_ppl(row: dict) -> str:
    """The number knobs are chosen on: the selection perplexity, or (rows from before 2026-12-04, marked †)
    the old calibration perplexity."""
    return f"{row['selection_ppl']:.2f}" if "selection_ppl" in row else f"{row['calib_ppl']:.2f}†"


def run_one(name: str, opts: dict) -> dict:
    from mosaic.pipeline import Options, run

    start, m = time.perf_counter(), machine()
    with tempfile.TemporaryDirectory() as tmp:
        r = run(Options(**SETTINGS, **opts, save_model=str(Path(tmp) / "model")))
        sppl = selection_ppl(Path(tmp) / "model")
    rec = r.get("recovery") or {}
    row = {"name": name, "options": opts, "achieved": r["sparsity"]["achieved"],
           "ppl": r["perplexity"]["wiki-offline"]["ppl"], "selection_ppl": sppl,
           "calib_dtype": r["settings"]["calib_dtype"],
           "time_s": {k: round(v, 1) for k, v in r["time_s"].items()},
           "wall_s": round(time.perf_counter() - start, 1), "shared_machine": SHARED_MACHINE,
           "machine": cpu_label(m), "date": m["date"]}
    if rec.get("reconstruct"):
        rc = rec["reconstruct"]
        row["reconstruct"] = {k: rc[k] for k in ("granularity", "steps", "lr", "batch", "tuned_layers",
                                                 "mean_error_before", "mean_error_after", "seconds")}
        row["reconstruct"]["per_layer"] = [(x["error_before"], x["error_after"]) for x in rc["layers"]]
    if r.get("zero_shot"):
        z = r["zero_shot"]
        row["zero_shot"] = {"tasks": z["tasks"], "mean_acc": z["mean_acc"],
                            "mean_acc_norm_or_acc": z["mean_acc_norm_or_acc"], "limit": z["limit"]}
    if rec.get("distill"):
        d = rec["distill"]
        row["distill"] = {k: d[k] for k in ("steps", "lr", "batch", "best_step", "held_out_kl_before",
                                            "held_out_kl_after", "seconds")}
    return row


def job_options(job: str) -> dict:
    """A ``pruning/variant`` job's options."""
    pruning, variant = job.split("/")
    return {**PRUNINGS[pruning], **VARIANTS[variant]}


def jobs(tune: bool, zero_shot: bool = False) -> list[tuple[str, dict]]:
    if zero_shot:
        return [(f"zs:{j}", {**(dict(prune_method="dense") if j == "dense" else job_options(j)), **ZS})
                for j in ZS_JOBS]
    if tune:
        base70 = PRUNINGS["sparsegpt-uniform-0.7"]
        return [("sparsegpt-uniform-0.7/none", base70)] + \
               [(f"sparsegpt-uniform-0.7/{k}", {**base70, **v}) for k, v in TUNE.items()]
    return [(f"{p}/{v}", job_options(f"{p}/{v}")) for p, v in JOBS]


def sweep(tune: bool, only: set[str] | None, zero_shot: bool = False) -> None:
    """Run the jobs not yet finished; a job named in ``--only`` whose row is from another CPU runs again
    here (the table then shows this CPU's row; the old one stays in the runs file)."""
    done, here = finished(RUNS, NAME), cpu_label(machine())
    for name, opts in jobs(tune, zero_shot):
        if only and name not in only:
            continue
        if name not in done or (only and cpu_of(done[name]) != here):
            append(RUNS, run_one(name, opts))


def same_run(done: dict[str, dict], name: str) -> dict | None:
    """The finished job ``name``, or a knob-sweep job that ran exactly its options (not run twice)."""
    if name in done:
        return done[name]
    pruning = name.split("/")[0]
    want = job_options(name)
    for key, row in done.items():
        if key.startswith(f"{pruning}/tune-") and row["options"] == want:
            return {**row, "same_as": key}
    return None


def _t(row: dict, phase: str) -> str:
    return f"{row['time_s'][phase]:.0f}" if phase in row["time_s"] else "—"


def zero_shot_table(done: dict[str, dict], cpus: dict[str, str]) -> list[str]:
    rows = [done[f"zs:{j}"] for j in ZS_JOBS if f"zs:{j}" in done]
    if not rows:
        return []
    tasks = ZS_TASKS.split(",")
    lines = ["", f"## Zero-shot (lm-eval 0-shot, first {ZS_LIMIT} items per task, fp32)", "",
             "acc (acc_norm where the task has it); the standard error of one task's acc at 500 items is "
             "about ±0.022. Each pruned row is re-pruned with the same options as its perplexity row above "
             "(`--zero-shot`), so its ppl is shown again.", "",
             "| model | " + " | ".join(tasks) + " | mean acc | mean acc_norm/acc | ppl | CPU |",
             "|---|" + "---|" * (len(tasks) + 4)]
    for r in rows:
        z = r["zero_shot"]["tasks"]
        cells = [f"{z[t]['acc']:.3f}" + (f" ({z[t]['acc_norm']:.3f})" if "acc_norm" in z[t] else "")
                 for t in tasks]
        lines.append(f"| {r['name'][3:]} | " + " | ".join(cells) +
                     f" | {r['zero_shot']['mean_acc']:.3f} | {r['zero_shot']['mean_acc_norm_or_acc']:.3f} | "
                     f"{r['ppl']:.2f} | {cpus[cpu_of(r)]} |")
    return lines


def report(m: dict) -> None:
    done = finished(RUNS, NAME)
    dense = done.get("dense")
    lines = ["# Recovery after pruning: SmolLM2-135M", "", f"Report written on: {machine_line(m)}.", "",
             "Settings: calibration 32 × 512 tokens of wiki-offline (seed 0), sequential statistics, fp32 "
             "weights; perplexity on the first 16 windows × 2048 tokens of the held-out wiki-offline eval "
             "split. Within a row only the recovery differs. `knob ppl`: 8 × 512 calibration-split "
             "`selection` windows that no job trained on or took statistics from (knobs are chosen on it, "
             "never on the eval split); † marks rows from before 2026-12-04, whose number is the old "
             "`calib ppl` on the 8 windows right after the statistics windows: for a distilled row, the "
             "first 8 of the windows it trained on, so not held-out text. Produced by "
             "`python benchmark/bench_recover.py`; times in seconds; ‡: another job shared the 2 cores, so "
             "the time is not an idle figure.", ""]
    cpus = cpu_letters(map(cpu_of, done.values()))
    dtypes = {cpu_of(r): calib_dtype_of(r) for r in done.values()
              if "calib_dtype" not in r.get("options", {})}
    lines += ["CPU and calibration forwards (each row names its CPU; times compare only within one letter; "
              "the CPUs differ in the calibration forwards' precision, which changes the pruned model, not "
              "only in fp32 rounding: `calib_dtype.md`): "
              + "; ".join(f"**{k}** = {c}, 2 cores, {dtypes.get(c, 'float32')} calibration forwards "
                          "(`--calib_dtype auto` as it resolved there)" for c, k in cpus.items()) + ".", ""]
    if dense:
        lines += [f"Dense: ppl {dense['ppl']:.2f}.", ""]
    lines += ["| pruning | recovery | ppl | ÷ dense | vs none | knob ppl | achieved | CPU | prune s | "
              "reconstruct s | distill s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in PRUNINGS:
        none = done.get(f"{p}/none")
        for v in VARIANTS:
            r = same_run(done, f"{p}/{v}")
            if r is None:
                continue
            shared = "‡" if r.get("shared_machine") else ""
            recon_s = r.get("reconstruct", {}).get("seconds")
            detail = v
            if r.get("reconstruct"):
                rc = r["reconstruct"]
                detail += f" ({rc['granularity']}, {rc['steps']} steps, lr {rc['lr']:g}, batch {rc['batch']})"
            if r.get("distill"):
                d = r["distill"]
                detail += (f" + distill ({d['steps']} steps × {d['batch']} windows, lr {d['lr']:g}; "
                           f"best {d['best_step']})")
            prune_s = r["time_s"].get("prune", 0) - (recon_s or 0)
            lines.append(
                f"| {p} | {detail} | {r['ppl']:.2f} | {r['ppl'] / dense['ppl']:.2f}× | " if dense else
                f"| {p} | {detail} | {r['ppl']:.2f} | — | ")
            if not none or v == "none":
                lines[-1] += "— | "
            elif cpu_of(none) != cpu_of(r):  # another CPU, other calibration forwards: compare within one
                lines[-1] += f"— (none on {cpus[cpu_of(none)]}) | "
            else:
                lines[-1] += f"{r['ppl'] / none['ppl'] - 1:+.1%} | "
            recon = f"{recon_s:.0f}{shared}" if recon_s is not None else "—"
            distill = f"{_t(r, 'distill')}{shared}" if "distill" in r["time_s"] else "—"
            lines[-1] += (f"{knob_ppl(r)} | {r['achieved']:.4f} | {cpus[cpu_of(r)]} | "
                          f"{prune_s:.0f}{shared} | {recon} | "
                          f"{distill} |")
    # the sweep's rows, and the main table's default row (the same options) for the CPUs the sweep lacks
    tuned = [r for k, r in done.items() if "/tune-" in k or k == "sparsegpt-uniform-0.7/recon"]
    if tuned:
        lines += ["", "## Knob sweep (SparseGPT 70% uniform; chosen on the knob ppl only)", "",
                  "| granularity | moves | steps | lr | knob ppl | eval ppl | mean layer error before → "
                  "after | CPU | reconstruct s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in tuned:
            rc = r["reconstruct"]
            moves = "weights + norms" if r["options"].get("reconstruct_norms") else "weights"
            lines.append(f"| {rc['granularity']} | {moves} | {rc['steps']} | {rc['lr']:g} | "
                         f"{knob_ppl(r)} | "
                         f"{r['ppl']:.2f} | {rc['mean_error_before']:.3f} → {rc['mean_error_after']:.3f} | "
                         f"{cpus[cpu_of(r)]} | "
                         f"{rc['seconds']:.0f}{'‡' if r.get('shared_machine') else ''} |")
    lines += zero_shot_table(done, cpus)
    missing = [f"{p}/{v}" for p, v in JOBS if same_run(done, f"{p}/{v}") is None]
    lines += not_measured(missing, RUNS, "Not measured (CPU time)",
                          f"The sweep resumes from `results/{RUNS.name}` (`--only=`).")
    # beyond the job list's own missing cells (above), so that no cell is named twice
    undistilled = [p for p in PRUNINGS if f"{p}/recon+distill" not in missing
                   and not any("distill_steps" in opts and same_run(done, f"{p}/{v}")
                               for v, opts in VARIANTS.items())]
    lacks = f"distillation after reconstruction on {', '.join(undistilled)}; " if undistilled else ""
    lines += [f"**The issue's grid also lacks** {lacks}the SparseGPT and ALPS searches at 80% (no map: "
              "ALPS's search alone took 1.7 hours at 70%), each none / recon / recon+distill. "
              "`alps-sgmap-0.5` stands in for the ALPS search at 50%.", ""]
    lines += notes("recover")
    write("recover", "\n".join(lines) + "\n",
          {"machine": m, "settings": SETTINGS, "rows": list(done.values())})


if __name__ == "__main__":
    m = machine()
    if "--report" not in sys.argv:
        if "--dense" in sys.argv and "dense" not in finished(RUNS, NAME):
            append(RUNS, run_one("dense", dict(prune_method="dense")))
        sweep("--tune" in sys.argv, parse_only(sys.argv), "--zero-shot" in sys.argv)
    report(m)
