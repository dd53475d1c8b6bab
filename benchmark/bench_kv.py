"""KV-cache sparsity (Mustafar) on SmolLM2-135M: uniform vs a sparsity per layer or per (layer, KV head),
alone and on top of weight pruning, with perplexity, the bytes the evaluated caches really held, and the time
of the sensitivity measurement.

Grid: weights {dense, SparseGPT 50%} × KV sparsity {0.5, 0.7, 0.8} × {K and V, K only, V only} ×
{per_token, per_channel} × allocation {uniform, layer, head}, plus each weight setting without KV sparsity;
and zero-shot (arc_easy, hellaswag, piqa, winogrande, 500 items each) for dense weights at no KV sparsity and
at 0.7 K and V per_token, uniform / layer / head.

Settings: perplexity on the first 16 windows × 2048 tokens of the held-out wiki-offline split, fp32 forwards,
through the teacher-forced Mustafar attention (window 32) with a ``KVMeter``:
achieved sparsity and bytes come from the keys and values those forwards computed (fp16 bytes, real tile
occupancy). The sensitivity reads 4 × 512 calibration windows of wiki-offline (seed 0), never the evaluation
split; it is measured once per (weights, criterion) at head granularity (the Fisher estimate, whose layer
curves are the head curves summed) and kept in ``results/kv_curves.jsonl``. SparseGPT 50%: 32 × 512
calibration windows (seed 0), sequential statistics, pruned once and kept in
``llm_weights/bench_kv_sparsegpt50``, with bf16 calibration forwards on CPU B and fp32 on CPU A
(``--calib_dtype auto`` until 2026-12-04: bf16 on a CPU with native bf16; now the model's dtype everywhere,
``calib_dtype.md``); the sensitivity and the evaluation run in fp32 on both.
Finished cells are kept in ``results/kv_runs.jsonl`` and skipped.

    python benchmark/bench_kv.py                 # every missing cell, the most important first (hours)
    python benchmark/bench_kv.py --list          # the cells in that order
    python benchmark/bench_kv.py --only=dense:0.7:kv:per_token:uniform,dense:0.7:kv:per_token:layer
    python benchmark/bench_kv.py --only=dense:none,zs:dense:0.7:head
    python benchmark/bench_kv.py --report        # only rebuild kv.md / kv.json

A cell is ``WEIGHTS:none`` (no KV sparsity), ``WEIGHTS:S:SIDE:CRITERION:ALLOCATION`` with WEIGHTS ``dense`` or
``sparsegpt50``, SIDE ``kv`` / ``k`` / ``v``, or ``zs:dense:none`` / ``zs:dense:0.7:ALLOCATION``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OLD_CPU, RESULTS, ROOT, cpu_label, cpu_letters, machine, machine_line, notes, write  # noqa: E402

USAGE = next(part for part in __doc__.split("\n\n") if "bench_kv.py --list" in part)
RUNS = RESULTS / "kv_runs.jsonl"
CURVES = RESULTS / "kv_curves.jsonl"
PRUNED = ROOT / "llm_weights" / "bench_kv_sparsegpt50"
WEIGHTS = ("dense", "sparsegpt50")
TARGETS = (0.7, 0.8, 0.5)
SIDES = ("kv", "k", "v")
CRITERIA = ("per_token", "per_channel")
ALLOCATIONS = ("uniform", "layer", "head")
TASKS = ("arc_easy", "hellaswag", "piqa", "winogrande")
EVAL = dict(dataset="wiki-offline", seqlen=2048, windows=16, dtype="float32")
WINDOW, ZS_LIMIT, ZS_BATCH = 32, 500, 16


# --- the cells -----------------------------------------------------------------------------------------

def cells() -> list[str]:
    """Every cell, the most important first: dense weights, per_token, K and V at 0.7, 0.8, 0.5; then K only,
    V only; then per_channel; then the same on SparseGPT 50% weights; zero-shot last."""
    grid = [(w, s, side, c, a) for w in WEIGHTS for c in CRITERIA for side in SIDES for s in TARGETS
            for a in ALLOCATIONS]
    ppl = [f"{w}:{s}:{side}:{c}:{a}" for w, s, side, c, a in grid]
    baselines = [f"{w}:none" for w in WEIGHTS]
    zero_shot = ["zs:dense:none"] + [f"zs:dense:0.7:{a}" for a in ALLOCATIONS]
    return [baselines[0], *ppl[:3], baselines[1], *ppl[3:], *zero_shot]


def parse(cell: str) -> dict:
    parts = cell.split(":")
    zs = parts[0] == "zs"
    if zs:
        parts = parts[1:]
    if parts[0] not in WEIGHTS or cell not in cells():
        raise SystemExit(f"unknown cell {cell!r}; see --list")
    if parts[1] == "none":
        return {"zs": zs, "weights": parts[0], "target": 0.0, "side": "none", "criterion": "per_token",
                "allocation": "uniform"}
    side, criterion, allocation = (parts[2], parts[3], parts[4]) if not zs else ("kv", "per_token", parts[2])
    return {"zs": zs, "weights": parts[0], "target": float(parts[1]), "side": side, "criterion": criterion,
            "allocation": allocation}


def cpu_of(row: dict) -> str:
    """The CPU a row ran on; rows from before 2026-12-03 record only the model name (all ran on OLD_CPU)."""
    return row["cpu"] if "(" in row["cpu"] else OLD_CPU


def runs() -> list[dict]:
    lines = RUNS.read_text().splitlines() if RUNS.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def rows() -> dict[str, dict]:
    """The finished cells, a cell run twice keeping its last row."""
    return {r["cell"]: r for r in runs()}


def rows_by_cpu() -> dict[str, dict[str, dict]]:
    """The finished cells of each CPU: a table line compares cells of one CPU only."""
    by: dict[str, dict[str, dict]] = {}
    for r in runs():
        by.setdefault(cpu_of(r), {})[r["cell"]] = r
    return by


# --- the work ------------------------------------------------------------------------------------------

_LOADED: dict = {}


def load(weights: str):
    """(model, tokenizer) in fp32 on CPU; SparseGPT 50% is pruned once, then read from its checkpoint."""
    if weights not in _LOADED:
        from mosaic.load import load_model

        if weights == "sparsegpt50" and not (PRUNED / "config.json").exists():
            from mosaic.pipeline import Options, run

            run(Options(prune_method="sparsegpt", sparsity_ratio=0.5, nsamples=32, seqlen=512, seed=0,
                        eval_datasets="none", save_model=str(PRUNED), overwrite=True))
        loaded = load_model("smollm2-135m" if weights == "dense" else str(PRUNED), dtype="float32",
                            device="cpu")
        _LOADED[weights] = (loaded.model, loaded.tokenizer)
    return _LOADED[weights]


def curves(weights: str, criterion: str):
    """Head sensitivity curves of ``weights`` under ``criterion``, measured once and kept in
    kv_curves.jsonl."""
    from mosaic.data import calibration_windows
    from mosaic.kv import KVSparsity
    from mosaic.kv import allocate as kvalloc

    kept = {(r["weights"], r["criterion"]): r for r in map(json.loads, CURVES.read_text().splitlines())} \
        if CURVES.exists() else {}
    if (weights, criterion) not in kept:
        model, tokenizer = load(weights)
        windows = calibration_windows(tokenizer, "wiki-offline", kvalloc.WINDOWS, kvalloc.SEQLEN, seed=0)
        spec = KVSparsity(0.0, 0.0, window=WINDOW, k_method=criterion, v_method=criterion)
        measured = kvalloc.sensitivity(model, windows, spec, "head")
        kept[weights, criterion] = {"weights": weights, "criterion": criterion, "cpu": cpu_label(machine()),
                                    "curves": measured.to_json()}
        with CURVES.open("a") as f:
            f.write(json.dumps(kept[weights, criterion]) + "\n")
    return kvalloc.Curves(**kept[weights, criterion]["curves"]), cpu_of(kept[weights, criterion])


def spec_for(c: dict):
    """The cell's KV sparsity: uniform, or solved from the curves; None without KV sparsity."""
    from mosaic.kv import KVSparsity
    from mosaic.kv import allocate as kvalloc

    if c["side"] == "none":
        return None, None
    k = c["target"] if c["side"] in ("kv", "k") else 0.0
    v = c["target"] if c["side"] in ("kv", "v") else 0.0
    spec = KVSparsity(k, v, window=WINDOW, k_method=c["criterion"], v_method=c["criterion"])
    if c["allocation"] == "uniform":
        return spec, None
    found, cpu = curves(c["weights"], c["criterion"])
    return kvalloc.solve(found if c["allocation"] == "head" else found.by_layer(), spec), (found, cpu)


def run_cell(cell: str) -> dict:
    from contextlib import nullcontext

    from mosaic.adapter import adapter_for
    from mosaic.data import eval_tokens
    from mosaic.eval import zeroshot as zs
    from mosaic.eval.perplexity import perplexity
    from mosaic.kv import KVMeter, mustafar_attention, report
    from mosaic.kv import allocate as kvalloc

    c = parse(cell)
    model, tokenizer = load(c["weights"])
    spec, found = spec_for(c)
    meter = KVMeter()
    scope = mustafar_attention(model, spec, observe=meter) if spec else nullcontext()
    row = {"cell": cell, **c, "cpu": cpu_label(machine()), "eval_dtype": EVAL["dtype"], "window": WINDOW,
           "attention": "blocked"}  # rows without it ran the full-product path (same numbers to rounding)
    start = time.perf_counter()
    with scope:
        if c["zs"]:
            row["zero_shot"] = zs.evaluate(model, tokenizer, list(TASKS), limit=ZS_LIMIT, batch_size=ZS_BATCH,
                                           offline=True, data_dir=zs.default_data_dir("llm_weights"))
        else:
            ids = eval_tokens(tokenizer, EVAL["dataset"])
            row["perplexity"] = perplexity(model, adapter_for(model), ids, EVAL["seqlen"], EVAL["windows"])
    row["eval_s"] = round(time.perf_counter() - start, 1)
    if spec:
        row["kv_cache"] = report(model, spec, meter if not c["zs"] else None)
    if found:  # the curves are measured once and reused: their time is that of the CPU that measured them
        found, row["sensitivity_cpu"] = found
        row["sensitivity_s"] = round(found.seconds, 1)
        row["describe"] = kvalloc.describe(spec, found.kv_heads)
    return row


def sweep(only: list[str] | None) -> None:
    """Run the missing cells; a cell named in ``--only`` whose row is from another CPU runs again here (so
    that a table line can compare cells of this CPU; the old row stays in the runs file)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    here = cpu_label(machine())
    for cell in only or cells():
        done = rows().get(cell)
        if done and (not only or cpu_of(done) == here):
            print(f"{cell}: done before, skipped", flush=True)
            continue
        row = run_cell(cell)
        with RUNS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k not in ("kv_cache", "zero_shot")}), flush=True)


# --- the report ----------------------------------------------------------------------------------------

def _ppl(r: dict | None) -> float | None:
    return r["perplexity"]["ppl"] if r and "perplexity" in r else None


def _cell(r: dict | None, base: float | None) -> str:
    p = _ppl(r)
    if p is None:
        return "—"
    return f"{p:.2f} ({p / base - 1:+.1%})" if base else f"{p:.2f}"


def _bytes(r: dict | None) -> str:
    m = (r or {}).get("kv_cache", {}).get("measured")
    return f"{m['per_token']['compressed']:.0f} B ({m['ratio']:.1%})" if m else "—"


def _achieved(r: dict | None) -> str:
    a = (r or {}).get("kv_cache", {}).get("achieved")
    return f"{a['k']:.4f} / {a['v']:.4f}" if a else "—"


def line_cpu(by_cpu: dict[str, dict[str, dict]], cells: list[str]) -> str | None:
    """The CPU whose rows a table line shows: the one that ran most of its cells (the newest on a tie)."""
    counts = {cpu: sum(c in got for c in cells) for cpu, got in by_cpu.items()}
    best = max(counts.values(), default=0)
    return [cpu for cpu, n in counts.items() if n == best][-1] if best else None


def ppl_table(by_cpu: dict[str, dict[str, dict]], letters: dict[str, str], weights: str) -> list[str]:
    bases = {letters[cpu]: _ppl(got.get(f"{weights}:none")) for cpu, got in by_cpu.items()}
    shown = ", ".join(f"{b:.2f} on {k}" for k, b in sorted(bases.items()) if b)
    lines = [f"### {'dense weights' if weights == 'dense' else 'SparseGPT 50% weights'}"
             + (f" (no KV sparsity: ppl {shown})" if shown else ""), "",
             "| KV | pruned | criterion | uniform | layer | head | excess removed: layer / head | "
             "achieved K / V (head) | bytes per token: uniform / head (of dense) | CPU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in sorted(TARGETS):
        for side in SIDES:
            for criterion in CRITERIA:
                names = {a: f"{weights}:{s}:{side}:{criterion}:{a}" for a in ALLOCATIONS}
                cpu = line_cpu(by_cpu, list(names.values()))
                if cpu is None:
                    continue
                by = by_cpu[cpu]  # every cell of a line, and its base, from one CPU
                base = _ppl(by.get(f"{weights}:none"))
                got = {a: by.get(name) for a, name in names.items()}
                u = _ppl(got["uniform"])
                removed = [f"{(u - _ppl(got[a])) / (u - base):.0%}"
                           if base and u and _ppl(got[a]) and u > 1.005 * base
                           else "—" for a in ("layer", "head")]  # only where uniform costs more than 0.5%
                lines.append(f"| {s} | {dict(kv='K and V', k='K only', v='V only')[side]} | {criterion} | "
                             + " | ".join(_cell(got[a], base) for a in ALLOCATIONS)
                             + f" | {' / '.join(removed)} | {_achieved(got['head'])} | "
                             f"{_bytes(got['uniform'])} / {_bytes(got['head'])} | {letters[cpu]} |")
    return lines


def zs_table(by: dict, letters: dict[str, str]) -> list[str]:
    lines = ["| dense weights, KV | " + " | ".join(TASKS) + " | mean | CPU |",
             "|---" * (len(TASKS) + 3) + "|"]
    for cell, name in (("zs:dense:none", "none"), *((f"zs:dense:0.7:{a}", f"0.7 {a}") for a in ALLOCATIONS)):
        r = by.get(cell)
        if r:
            tasks = r["zero_shot"]["tasks"]
            lines.append(f"| {name} | " + " | ".join(f"{tasks[t]['acc']:.3f}" for t in TASKS)
                         + f" | {r['zero_shot']['mean_acc']:.3f} | {letters[cpu_of(r)]} |")
    return lines


def targets(by: dict) -> list[str]:
    """The issue's targets, each met or missed from the rows of one CPU (``by``)."""
    def p(cell):
        return _ppl(by.get(cell))

    out, base = [], p("dense:none")
    u70, u80 = p("dense:0.7:kv:per_token:uniform"), p("dense:0.8:kv:per_token:uniform")
    best = {s: min([x for x in (p(f"dense:{s}:kv:per_token:layer"), p(f"dense:{s}:kv:per_token:head")) if x],
                   default=None) for s in (0.7, 0.8)}
    if base and best[0.7]:
        out.append(f"- allocated 70% within +3.5% of the dense cache: {best[0.7] / base - 1:+.1%} "
                   f"({'met' if best[0.7] / base - 1 <= 0.035 else 'missed'}; uniform {u70 / base - 1:+.1%})"
                   if u70 else f"- allocated 70%: {best[0.7] / base - 1:+.1%}")
    if base and best[0.8] and u70:
        out.append(f"- allocated 80% at most uniform 70%'s excess: {best[0.8] / base - 1:+.2%} "
                   f"vs {u70 / base - 1:+.2%} ({best[0.8]:.4f} vs {u70:.4f}: "
                   f"{'met' if best[0.8] <= u70 else 'missed'})")
    if base and u80:
        out.append(f"- uniform 80% for reference: {u80 / base - 1:+.1%}")
    pairs = [(f"{w} {s} {side} {a}", pt, pc) for w in WEIGHTS for s in TARGETS for side in SIDES
             for a in ALLOCATIONS if (pt := p(f"{w}:{s}:{side}:per_token:{a}"))
             and (pc := p(f"{w}:{s}:{side}:per_channel:{a}"))]
    worse = [name for name, pt, pc in pairs if pc < pt]
    out.append("- per_token vs per_channel: not measured (no per_channel cell yet)" if not pairs
               else f"- per_token better than per_channel in all {len(pairs)} measured pairs" if not worse
               else f"- per_channel beats per_token at: {', '.join(worse)}")
    for allocation in ("head", "layer"):
        r70 = (by.get(f"dense:0.7:kv:per_token:{allocation}") or {}).get("kv_cache", {}).get("measured")
        if r70:
            out.append(f"- compressed KV bytes at 70% ({allocation} allocation, measured): "
                       f"{r70['ratio']:.1%} of dense ({'met' if r70['ratio'] <= 0.48 else 'missed'}: ≤ 48%)")
            break
    return out


def sensitivity_times(by: dict, letters: dict[str, str]) -> list[str]:
    """The sensitivity passes' times, each on the CPU that measured it."""
    times: dict[str, list[float]] = {}
    for r in by.values():
        if "sensitivity_s" in r:
            cpu = letters.get(r.get("sensitivity_cpu", OLD_CPU), "?")
            times.setdefault(cpu, []).append(r["sensitivity_s"])
    return [f"- sensitivity pass on {k}: {min(t):.0f}–{max(t):.0f} s "
            f"({'met' if max(t) <= 120 else 'missed'}: ≤ 2 min)" for k, t in sorted(times.items())]


def report(m: dict) -> None:
    by, by_cpu = rows(), rows_by_cpu()
    letters = cpu_letters([*by_cpu, cpu_label(m)])
    lines = ["# KV-cache sparsity (Mustafar): SmolLM2-135M, uniform vs allocated", "",
             f"Machine (this report): {machine_line(m)}.", "", __doc__.split("\n\n")[2].replace("\n", " "),
             "Produced by `python benchmark/bench_kv.py`.", "",
             "Each perplexity cell: ppl (vs no KV sparsity). *Excess removed*: the share of uniform's "
             "perplexity excess over the dense cache that the allocation removes. *Achieved*: the share of "
             "zeros among the pruned keys' / values' entries in the evaluated caches. *Bytes per token*: "
             "the evaluated caches (2048 tokens, the last 32 dense) in the bitmap format, fp16, over their "
             "tokens, with the share of the dense cache.", "",
             "CPU (each table line compares cells of one CPU, against that CPU's run without KV sparsity; "
             "the sensitivity curves are measured once, on the CPU named in the targets, and reused): "
             + "; ".join(f"**{k}** = {c}, 2 cores" for c, k in letters.items()) + ".", ""]
    for weights in WEIGHTS:
        lines += ppl_table(by_cpu, letters, weights) + [""]
    if any(c.startswith("zs:") for c in by):
        lines += [f"### Zero-shot accuracy (limit {ZS_LIMIT} per task)", ""] + zs_table(by, letters) + [""]
    goal = [f"dense:{s}:kv:per_token:{a}" for s in (0.7, 0.8) for a in ALLOCATIONS] + ["dense:none"]
    cpu = line_cpu(by_cpu, goal) or cpu_label(m)
    lines += [f"### Targets (CPU {letters[cpu]})", ""] + targets(by_cpu.get(cpu, {})) \
        + sensitivity_times(by, letters) + [""]
    learned = [(c, by[c]["describe"])
               for c in (f"dense:0.7:kv:per_token:{a}" for a in ("layer", "head")) if c in by]
    for cell, text in learned:
        lines += [f"What `{cell}` learned:", ""] + [f"    {t}" for t in text] + [""]
    missing = [c for c in cells() if c not in by]
    if missing:
        lines += [f"**Not measured yet** ({len(missing)} cells): {', '.join(missing)}.", ""]
    lines += notes("kv")
    write("kv", "\n".join(lines) + "\n", {"machine": m, "eval": EVAL, "rows": list(by.values())})


if __name__ == "__main__":
    unknown = [a for a in sys.argv[1:] if a not in ("--list", "--report") and not a.startswith("--only=")]
    if unknown:
        raise SystemExit(f"unknown argument {unknown[0]!r}; usage:\n{USAGE}")
    if "--list" in sys.argv:
        print("\n".join(cells()))
    elif "--report" in sys.argv:
        report(machine())
    else:
        only = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--only=")), None)
        chosen = only.split(",") if only else None
        for cell in chosen or []:
            parse(cell)
        sweep(chosen)
        report(machine())
