"""What a run bought, assembled from the steps' values: results.json (``record``, then what evaluation adds),
the short summary printed at the end, the plots, and the time and memory it took."""

from __future__ import annotations

import logging
import math
import platform
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mosaic import __version__, dist, runconfig
from mosaic import allocate as alloc
from mosaic.adapter import PROJECTIONS
from mosaic.data import parse_mixture, source_counts
from mosaic.errors import EvaluationError
from mosaic.export import replace_file, write_json
from mosaic.kv.report import summary_lines as kv_summary_lines

if TYPE_CHECKING:  # the steps' values that ``record`` reads
    from mosaic import recover
    from mosaic.allocate import Allocation
    from mosaic.options import Options, Plan
    from mosaic.profile import Profile
    from mosaic.source import Setup

log = logging.getLogger(__name__)

KV_SCORED = ("scored as if every token, the prompt included, were decoded one by one (each older than "
             "the window pruned)")


def _m(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def geometric_mean(perplexities: dict[str, dict]) -> float:
    """exp of the mean log perplexity: every text counts alike, whatever its perplexity's scale."""
    logs = [math.log(p["ppl"]) for p in perplexities.values()]
    return math.exp(sum(logs) / len(logs))


def _precision(dtype: str) -> str:
    return f"{dtype} weights" + (", fp32 masters" if dtype != "float32" else "")


def summary_text(r: dict) -> str:
    a = r["args"]
    s = r["sparsity"]
    kind = a["sparsity_type"]
    alloc = r["settings"].get("allocation")
    head = f"Mosaic — {a['model']} · {a['prune_method']}"
    if alloc:
        head += f" · target {s['target']:.2%} {kind} · allocation {alloc}"
    if r["settings"].get("calib_stats"):
        head += f" · {r['settings']['calib_stats']} statistics"
    if r["settings"].get("calib_dtype"):
        head += f" · {r['settings']['calib_dtype']} calibration forwards"
    if r["settings"].get("ranks", 1) > 1:
        head += f" · {r['settings']['ranks']} ranks"
    lines = [head]
    if "structured" in s:
        lines.append(f"  removed      {s['achieved']:.4%} of decoder projection weights: "
                     f"{s['structured']:.2%} as whole heads/channels, {s['unstructured']:.2%} as zeros in "
                     "what is kept")
    else:
        lines.append(f"  sparsity     {s['achieved']:.4%} of decoder projection weights are zero "
                     f"({s['zeros']:,} of {s['projection_params']:,})")
    if abs(s.get("drift", 0.0)) >= 5e-7:
        lines.append(f"  allocation   weighted mean {s['allocated_overall']:.4%} "
                     f"(drift {s['drift']:+.4%} from target)")
    before, after = r["parameters"]["before"], r["parameters"]["after"]
    lines.append(f"  parameters   {_m(before['total'])} total → {_m(after['total'])}; "
                 f"nonzero {_m(before['nonzero'])} → {_m(after['nonzero'])}")
    bytes_line = f"  bytes        {_mb(before['bytes'])} → {_mb(after['bytes'])} in memory"
    if "checkpoint" in r:
        bytes_line += f"; checkpoint {_mb(r['checkpoint']['safetensors_bytes'])} of safetensors"
    lines.append(bytes_line)
    if "composite" in r:
        widths = r["composite"]["layers"]
        lines.append(f"  widths       heads {min(w['heads'] for w in widths)}–"
                     f"{max(w['heads'] for w in widths)}, MLP {min(w['intermediate'] for w in widths)}–"
                     f"{max(w['intermediate'] for w in widths)} per layer")
        cs = r["composite"].get("search")
        if cs:
            changed = sum(a != b for a, b in zip(cs["widths"]["rule"], cs["widths"]["search"]))
            lines.append(f"  search       {cs['chosen']} plan kept: held-out KL {cs['kl']['search']:.4f} "
                         f"searched vs {cs['kl']['rule']:.4f} rule (both remove "
                         f"{cs['structured_params_removed']:,} parameters; {changed} of {len(widths)} layers "
                         "reshaped)")
    if after["bytes"] == before["bytes"] and s["achieved"] > 0:
        lines.append("               (unstructured zeros are stored dense: no size or speed gain by "
                     "themselves)")
    damped = [n for n in r.get("notes", []) if "damp" in n]
    if damped:
        lines.append(f"  numerics     SparseGPT needed more damping for {len(damped)} projections (up to "
                     f"{max(n['damp'] for n in damped):g} × mean diag H instead of "
                     f"{a.get('percdamp', 0.01):g}); see notes in results.json")
    if "alps" in r:
        al = r["alps"]
        lines.append(f"  alps         ADMM iterations {al['iterations']['min']}–{al['iterations']['max']} "
                     f"(mean {al['iterations']['mean']:.0f}, {al['iterations']['at_cap']} at the cap); "
                     + ", ".join(f"{k} {v:.1f} s" for k, v in al["seconds"].items()))
    for name, p in r["perplexity"].items():
        lines.append(f"  perplexity   {name}: {p['ppl']:.3f} ({p['windows']} windows × {p['seqlen']} tokens)")
    if "perplexity_geomean" in r:
        lines.append(f"  perplexity   geometric mean of the {len(r['perplexity'])} texts: "
                     f"{r['perplexity_geomean']:.3f}")
    if "kv_cache" in r:
        lines += ["  " + line for line in kv_summary_lines(r["kv_cache"])]
        lines += [f"  kv learned   {line}" for line in r["kv_cache"].get("learned", [])]
        if "sensitivity_s" in r["kv_cache"]:
            lines.append(f"  kv learned   sensitivity {r['kv_cache']['sensitivity_s']:.1f} s on "
                         f"{r['kv_cache']['sensitivity_tokens']} calibration tokens")
        lines.append(f"  kv cache     {KV_SCORED}")
    for task, z in r.get("zero_shot", {}).get("tasks", {}).items():
        lines.append(f"  zero-shot    {task}: acc {z['acc']:.4f}"
                     + (f", acc_norm {z['acc_norm']:.4f}" if "acc_norm" in z else ""))
    if "zero_shot" in r:
        z = r["zero_shot"]
        lines.append(f"  zero-shot    mean acc {z['mean_acc']:.4f} over {len(z['tasks'])} tasks"
                     + (f" (limit {z['limit']} per task)" if z.get("limit") else ""))
    rec = r.get("recovery") or {}
    if rec.get("reconstruct"):
        rc = rec["reconstruct"]
        lines.append(f"  reconstruct  {rc['granularity']}{' + norms' if rc.get('norms') else ''}, "
                     f"{rc['steps']} steps × lr {rc['lr']:g}: layer "
                     f"output error {rc['mean_error_before']:.4f} → {rc['mean_error_after']:.4f} "
                     f"(mean relative; {rc['tuned_layers']} of {len(rc['layers'])} layers tuned) in "
                     f"{rc['seconds']:.1f} s")
    if (rec.get("reconstruct") or {}).get("guard"):
        g = rec["reconstruct"]["guard"]
        whole, none = sum(s == 1 for s in g["shares"]), sum(s == 0 for s in g["shares"])
        lines.append(f"  guard        {', '.join(g['texts'])}: kept {g['mean_share']:.0%} of the tuning on "
                     f"average ({whole} layers all of it, {none} none of it)")
    if rec.get("distill"):
        d = rec["distill"]
        lines.append(f"  distill      {d['steps']} steps: held-out KL to the dense model "
                     f"{d['held_out_kl_before']:.4f} → {d['held_out_kl_after']:.4f} "
                     f"(best at step {d['best_step']}) in {d['seconds']:.1f} s"
                     + (f" on {d['device']} ({_precision(d['dtype'])})" if "device" in d else ""))
    status = r.get("evaluation", {}).get("status")
    if status and status != "complete":
        lines.append(f"  evaluation   {status}"
                     + (": results above are what finished" if status != "pending" else ""))
    t = r.get("time_s", {})
    lines.append("  time         " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()))
    if "memory" in r:
        lines.append(f"  peak memory  RSS {r['memory']['peak_rss_gib']:.2f} GiB"
                     + (f", CUDA {r['memory']['peak_cuda_gib']:.2f} GiB"
                        if "peak_cuda_gib" in r["memory"] else ""))
    if r["args"].get("save"):
        lines.append(f"  results      {r['args']['save']}/results.json")
    if "checkpoint" in r:
        lines.append(f"  checkpoint   {r['checkpoint']['path']}")
    return "\n".join(lines)


def write_plots(r: dict, directory: Path) -> list[Path]:
    """Heat-map of allocated sparsity (layers × projections) and outlier ratios by depth; the
    reconstruction's layer output error by depth."""
    return allocation_plots(r, directory) + reconstruction_plot(r, directory) + widths_plot(r, directory)


def widths_plot(r: dict, directory: Path) -> list[Path]:
    """Composite planned by search: kept query heads and MLP channels per layer, the rule's against the
    search's."""
    cs = (r.get("composite") or {}).get("search")
    if not cs:
        return []
    plt = _pyplot()
    rule, searched = cs["widths"]["rule"], cs["widths"]["search"]
    depth = range(len(rule))
    fig, axes = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for ax, key, label in ((axes[0], "heads", "kept query heads"),
                           (axes[1], "intermediate", "kept MLP channels")):
        ax.plot(depth, [w[key] for w in rule], marker=".", label="rule")
        ax.plot(depth, [w[key] for w in searched], marker=".", label="search")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[1].set_xlabel("layer")
    axes[0].set_title(f"composite widths per layer · {cs['chosen']} plan kept (held-out KL "
                      f"{cs['kl']['search']:.4f} search, {cs['kl']['rule']:.4f} rule)", fontsize=9)
    fig.tight_layout()
    path = directory / "widths.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reconstruction_plot(r: dict, directory: Path) -> list[Path]:
    rc = (r.get("recovery") or {}).get("reconstruct")
    if not rc or not rc["layers"]:
        return []
    plt = _pyplot()
    depth = [row["layer"] for row in rc["layers"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(depth, [row["error_before"] for row in rc["layers"]], marker=".", label="pruned")
    ax.plot(depth, [row["error_after"] for row in rc["layers"]], marker=".", label="reconstructed")
    ax.set_xlabel("layer")
    ax.set_ylabel("relative output error vs the dense layer")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"reconstruction ({rc['granularity']}, {rc['steps']} steps, lr {rc['lr']:g})", fontsize=9)
    fig.tight_layout()
    path = directory / "reconstruction.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def allocation_plots(r: dict, directory: Path) -> list[Path]:
    rows = r["sparsity"]["per_projection"]
    if not rows or "allocated" not in rows[0] or r["settings"].get("allocation") in (None, "uniform"):
        return []
    plt = _pyplot()

    n_layers = r["model"]["layers"]
    grid = [[0.0] * len(PROJECTIONS) for _ in range(n_layers)]
    ratio = [[0.0] * len(PROJECTIONS) for _ in range(n_layers)]
    for row in rows:
        j = PROJECTIONS.index(row["projection"])
        grid[row["layer"]][j] = row["allocated"]
        ratio[row["layer"]][j] = row.get("outlier_ratio", 0.0)
    written = []
    title = (f"{r['args']['prune_method']} · target {r['sparsity']['target']:.0%} · "
             f"{r['settings']['allocation']}")
    fig, ax = plt.subplots(figsize=(5, max(4, n_layers * 0.22)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(PROJECTIONS)), PROJECTIONS)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="allocated sparsity")
    fig.tight_layout()
    written.append(directory / "allocation_heatmap.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    if "profile" in r:
        fig, ax = plt.subplots(figsize=(7, 4))
        for j, p in enumerate(PROJECTIONS):
            ax.plot(range(n_layers), [ratio[i][j] for i in range(n_layers)], label=p, marker=".")
        ax.plot(range(n_layers), r["profile"]["layer_ratios"], label="layer (OWL)", color="black",
                linestyle="--")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"outlier ratio, % of scores > {r['profile']['hyper_m']:g}× mean")
        ax.legend(fontsize=8, ncol=2)
        ax.set_title("projection outlier distribution", fontsize=9)
        fig.tight_layout()
        written.append(directory / "outlier_ratios.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


# --- results.json ----------------------------------------------------------------------------------

def alps_report(notes: list[dict], opts: Options) -> dict:
    """ALPS's knobs, iterations per projection and time per phase, summed from the kernel's notes."""
    iters = [n["alps_iters"] for n in notes if "alps_iters" in n]
    return {"rho0": opts.alps_rho0, "max_iter": opts.alps_max_iter, "cg_iters": opts.alps_cg_iters,
            "iterations": {"mean": sum(iters) / max(len(iters), 1), "min": min(iters, default=0),
                           "max": max(iters, default=0),
                           "at_cap": sum(i >= opts.alps_max_iter for i in iters)},
            "start_kept": sum(bool(n.get("alps_start_kept")) for n in notes),
            "seconds": {k: sum(n.get(f"{k}_s", 0.0) for n in notes) for k in ("eigh", "admm", "cg")}}


def recovery_report(reconstruction: recover.Reconstruction | None, distilled: dict | None) -> dict | None:
    if reconstruction is None and distilled is None:
        return None
    return {"reconstruct": reconstruction.report() if reconstruction else None, "distill": distilled}


def record(setup: Setup, plan: Plan, allocation: Allocation, profile: Profile | None, notes: list[dict],
           opts: Options, recovery: dict | None = None) -> dict:
    """results.json as it stands once pruning is done; evaluation fills in the rest."""
    loaded, source = setup.loaded, setup.source
    achieved = source.achieved()
    sparsity = sparsity_report(opts.sparsity_ratio, allocation.sparsity, achieved, profile,
                               allocation.composite)
    if allocation.sparsity is not None and allocation.source != "uniform":
        sparsity["allocated_overall"] = alloc.overall(allocation.sparsity, allocation.params)
        sparsity["drift"] = sparsity["allocated_overall"] - allocation.target
    nm = allocation.nm
    results = {
        "mosaic_version": __version__,
        "command": opts.extra.get("argv", sys.argv),
        "args": {k: v for k, v in asdict(opts).items() if k != "extra"},
        "versions": versions(),
        "model": {"source": loaded.source, "path": loaded.path, "family": setup.adapter.family,
                  "layers": setup.n_layers, "dtype": _name(setup.dtype), "device": str(setup.compute)},
        "settings": {"seqlen": setup.seqlen, "eval_seqlen": setup.eval_seqlen,
                     "calib_stats": opts.calib_stats if plan.mode else None, "mode": plan.mode,
                     "calib_dtype": _name(setup.calib_dtype) if plan.needs_calibration else None,
                     "allocation": allocation.source, "Lamda": plan.lamda, "Hyper_m": plan.hyper_m,
                     "nm": nm if any(nm) else None, "ranks": dist.world()},
        "sparsity": sparsity,
        "parameters": {"before": source.before, "after": source.after()},
        "perplexity": {},
        "notes": notes,
        "evaluation": {"status": "pending"},
    }
    if source.report() is not None:
        results["streaming"] = source.report()
    if allocation.composite is not None:
        results["composite"] = allocation.composite
    if allocation.search is not None:
        results["search"] = allocation.search
    if plan.kernel is not None and plan.kernel.name == "alps":
        results["alps"] = alps_report(notes, opts)
    if profile is not None:
        results["profile"] = profile.to_json()
    if recovery is not None:
        results["recovery"] = recovery
    if plan.needs_calibration:
        results["calibration"] = calibration_report(opts, plan, setup.seqlen)
    return results


def calibration_report(opts: Options, plan: Plan, seqlen: int) -> dict:
    """The calibration text: each source's weight, and its windows and tokens per role."""
    from mosaic.options import window_counts  # options imports this module's neighbours

    distill = opts.distill_dataset if plan.distill is not None else None
    per = source_counts(opts.calib_dataset, window_counts(opts, plan), distill, plan.guard)
    weights = {s.name: s.weight for s in parse_mixture(opts.calib_dataset)}
    distill_weights = {s.name: s.weight for s in parse_mixture(distill, "distill_dataset")} if distill else {}
    return {"seqlen": seqlen, "sources": [
        {"name": name, "weight": weights.get(name), "distill_weight": distill_weights.get(name),
         "windows": {role: n for role, n in roles.items() if n}, "tokens": sum(roles.values()) * seqlen}
        for name, roles in per.items()]}


def stamp(results: dict, timer: Timer) -> None:
    """Time per phase and peak memory so far, into the record."""
    results["time_s"] = timer.seconds
    results["memory"] = peak_memory()


class Timer:
    """Wall time per phase; phases never nest, so they add up to the run's time."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.perf_counter() - start, 3)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def versions() -> dict:
    import accelerate
    import datasets
    import transformers

    out = {"mosaic": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "accelerate": accelerate.__version__,
           "datasets": datasets.__version__}
    try:
        from importlib.metadata import version

        out["lm_eval"] = version("lm_eval")
    except Exception:
        pass
    return out


def peak_memory() -> dict:
    mem = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if torch.cuda.is_available():
        mem["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return mem


def sparsity_report(target: float, allocated, achieved: dict, profile, composite: dict | None = None) -> dict:
    """Allocated and achieved sparsity per (layer, projection). For composite runs the per-projection
    fractions refer to the kept (sliced) weights and ``achieved`` overall to the original weights."""
    rows = []
    for i, got in enumerate(achieved["per_layer"]):
        for p, s in got.items():
            row = {"layer": i, "projection": p, "achieved": round(s, 6)}
            if allocated is not None:
                row["allocated"] = round(allocated[i][p], 6)
            if profile is not None:
                row["outlier_ratio"] = round(profile.ratios[i][p], 4)
            rows.append(row)
    report = {"target": target, "achieved": achieved["overall"], "zeros": achieved["zeros"],
              "projection_params": achieved["params"], "per_projection": rows}
    if composite is not None:
        before = composite["params_before"]
        report["achieved"] = (before - achieved["params"] + achieved["zeros"]) / before
        report["structured"] = composite["structured_ratio"]
        report["unstructured"] = achieved["zeros"] / before
        report["projection_params_before"] = before
    return report


@dataclass
class Saved:
    """Where the run was written; ``update`` rewrites results.json and summary.txt in place, atomically."""

    results_dir: Path | None
    checkpoint: Path | None

    @classmethod
    def of(cls, save: str | None, save_model: str | None) -> Saved:
        return cls(Path(save) if save else None, Path(save_model) if save_model else None)

    def where(self) -> list[str]:
        return [str(p) for p in (self.checkpoint, self.results_dir) if p is not None]

    def update(self, results: dict) -> None:
        if self.results_dir is not None:
            write_record(self.results_dir, results)

    @contextmanager
    def evaluation(self, results: dict, timer: Timer) -> Iterator[None]:
        """The evaluation's status in the record: running, then complete; a failure or Ctrl-C marks it
        failed (interrupted) and raises ``EvaluationError``: the checkpoint and what finished stay on disk."""
        results["evaluation"] = {"status": "running"}
        try:
            yield
            results["evaluation"] = {"status": "complete"}
            self.progress(results, timer)
        except BaseException as err:
            status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            results["evaluation"] = {"status": status, "error": f"{type(err).__name__}: {err}"[:500]}
            try:
                self.progress(results, timer)
            except BaseException as write_err:  # e.g. the disk filled up: the checkpoint is still there
                log.error("could not update results.json: %s", write_err)
            raise EvaluationError(status, self.where(), err) from err

    def progress(self, results: dict, timer: Timer) -> None:
        """Time and memory so far, then the record rewritten: after each part of the evaluation."""
        stamp(results, timer)
        self.update(results)


def write_record(directory: Path, results: dict) -> None:
    """results.json, summary.txt and config.yaml (the run's options: ``--config`` repeats it), each replaced
    atomically."""
    replace_file(directory / "results.json", lambda tmp: write_json(tmp, results))
    replace_file(directory / "summary.txt", lambda tmp: tmp.write_text(summary_text(results) + "\n"))
    replace_file(directory / "config.yaml", lambda tmp: runconfig.write(tmp, results["args"]))


def checkpoint_manifest(results: dict, source_model: str, n_layers: int) -> dict:
    """``mosaic.json`` beside the weights: how they were pruned, and each layer's allocated sparsities."""
    return {"mosaic_version": __version__, "source_model": source_model,
            "method": results["args"]["prune_method"],
            "sparsity_type": results["args"]["sparsity_type"], "settings": results["settings"],
            "sparsity": {k: results["sparsity"][k] for k in ("target", "achieved")},
            "allocation": [{r["projection"]: r.get("allocated") for r in results["sparsity"]["per_projection"]
                            if r["layer"] == i} for i in range(n_layers)]}

