"""What a run bought: the short summary printed at the end, and the allocation plots."""

from __future__ import annotations

from pathlib import Path

from mosaic.adapter import PROJECTIONS


def _m(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


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
    lines = [head]
    if "structured" in s:
        lines.append(f"  removed      {s['achieved']:.4%} of decoder projection weights: {s['structured']:.2%} as whole "
                     f"heads/channels, {s['unstructured']:.2%} as zeros in what is kept")
    else:
        lines.append(f"  sparsity     {s['achieved']:.4%} of decoder projection weights are zero "
                     f"({s['zeros']:,} of {s['projection_params']:,})")
    if abs(s.get("drift", 0.0)) >= 5e-7:
        lines.append(f"  allocation   weighted mean {s['allocated_overall']:.4%} (drift {s['drift']:+.4%} from target)")
    before, after = r["parameters"]["before"], r["parameters"]["after"]
    lines.append(f"  parameters   {_m(before['total'])} total → {_m(after['total'])}; "
                 f"nonzero {_m(before['nonzero'])} → {_m(after['nonzero'])}")
    bytes_line = f"  bytes        {_mb(before['bytes'])} → {_mb(after['bytes'])} in memory"
    if "checkpoint" in r:
        bytes_line += f"; checkpoint {_mb(r['checkpoint']['safetensors_bytes'])} of safetensors"
    lines.append(bytes_line)
    if "composite" in r:
        widths = r["composite"]["layers"]
        lines.append(f"  widths       heads {min(w['heads'] for w in widths)}–{max(w['heads'] for w in widths)}, "
                     f"MLP {min(w['intermediate'] for w in widths)}–{max(w['intermediate'] for w in widths)} per layer")
    if after["bytes"] == before["bytes"] and s["achieved"] > 0:
        lines.append("               (unstructured zeros are stored dense: no size or speed gain by themselves)")
    damped = [n for n in r.get("notes", []) if "damp" in n]
    if damped:
        lines.append(f"  numerics     SparseGPT needed more damping for {len(damped)} projections (up to "
                     f"{max(n['damp'] for n in damped):g} × mean diag H instead of {a.get('percdamp', 0.01):g}); "
                     "see notes in results.json")
    if "alps" in r:
        al = r["alps"]
        lines.append(f"  alps         ADMM iterations {al['iterations']['min']}–{al['iterations']['max']} "
                     f"(mean {al['iterations']['mean']:.0f}, {al['iterations']['at_cap']} at the cap); "
                     + ", ".join(f"{k} {v:.1f} s" for k, v in al["seconds"].items()))
    for name, p in r["perplexity"].items():
        lines.append(f"  perplexity   {name}: {p['ppl']:.3f} ({p['windows']} windows × {p['seqlen']} tokens)")
    if "kv_cache" in r:
        kv, size = r["kv_cache"], r["kv_cache"]["bytes"]
        lo, hi = size["compressed"]
        held = _mb(lo) if lo == hi else f"{_mb(lo)}–{_mb(hi)}"
        lines.append(f"  kv cache     K {kv['achieved']['k']:.1%} / V {kv['achieved']['v']:.1%} of each vector pruned "
                     f"beyond a {kv['window']}-token window ({kv['method']}); a {size['context']}-token fp16 cache: "
                     f"{_mb(size['dense'])} dense → {held} ({size['ratio'][0]:.0%}–{size['ratio'][1]:.0%})")
    for task, z in r.get("zero_shot", {}).get("tasks", {}).items():
        lines.append(f"  zero-shot    {task}: acc {z['acc']:.4f}" + (f", acc_norm {z['acc_norm']:.4f}" if "acc_norm" in z else ""))
    if "zero_shot" in r:
        z = r["zero_shot"]
        lines.append(f"  zero-shot    mean acc {z['mean_acc']:.4f} over {len(z['tasks'])} tasks"
                     + (f" (limit {z['limit']} per task)" if z.get("limit") else ""))
    rec = r.get("recovery") or {}
    if rec.get("reconstruct"):
        rc = rec["reconstruct"]
        lines.append(f"  reconstruct  {rc['granularity']}, {rc['steps']} steps × lr {rc['lr']:g}: layer output error "
                     f"{rc['mean_error_before']:.4f} → {rc['mean_error_after']:.4f} (mean relative; "
                     f"{rc['tuned_layers']} of {len(rc['layers'])} layers tuned) in {rc['seconds']:.1f} s")
    if rec.get("distill"):
        d = rec["distill"]
        lines.append(f"  distill      {d['steps']} steps: held-out KL to the dense model {d['held_out_kl_before']:.4f} → "
                     f"{d['held_out_kl_after']:.4f} (best at step {d['best_step']}) in {d['seconds']:.1f} s")
    status = r.get("evaluation", {}).get("status")
    if status and status != "complete":
        lines.append(f"  evaluation   {status}" + (": results above are what finished" if status != "pending" else ""))
    t = r.get("time_s", {})
    lines.append("  time         " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()))
    if "memory" in r:
        lines.append(f"  peak memory  RSS {r['memory']['peak_rss_gib']:.2f} GiB"
                     + (f", CUDA {r['memory']['peak_cuda_gib']:.2f} GiB" if "peak_cuda_gib" in r["memory"] else ""))
    if r["args"].get("save"):
        lines.append(f"  results      {r['args']['save']}/results.json")
    if "checkpoint" in r:
        lines.append(f"  checkpoint   {r['checkpoint']['path']}")
    return "\n".join(lines)


def write_plots(r: dict, directory: Path) -> list[Path]:
    """Heat-map of allocated sparsity (layers × projections) and outlier ratios by depth; the
    reconstruction's layer output error by depth."""
    return allocation_plots(r, directory) + reconstruction_plot(r, directory)


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
    title = f"{r['args']['prune_method']} · target {r['sparsity']['target']:.0%} · {r['settings']['allocation']}"
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
        ax.plot(range(n_layers), r["profile"]["layer_ratios"], label="layer (OWL)", color="black", linestyle="--")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"outlier ratio, % of scores > {r['profile']['hyper_m']:g}× mean")
        ax.legend(fontsize=8, ncol=2)
        ax.set_title("projection outlier distribution", fontsize=9)
        fig.tight_layout()
        written.append(directory / "outlier_ratios.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
