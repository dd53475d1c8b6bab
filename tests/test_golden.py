"""Golden runs: a refactor must not change one bit of what a run prunes.

For each method family (kernels × allocations × sparsity types, in memory and streamed) on a tiny
LLaMA and Qwen2, the pruned checkpoint's tensors and ``results.json``'s sparsity section are hashed and
compared with ``golden.json``. Floating-point results depend on the CPU's vector units and the library
versions, so the hashes are kept per machine fingerprint (CPU model and flags, torch, transformers); on a
machine without recorded hashes the test is skipped with that reason. Record them with
``MOSAIC_GOLDEN=record pytest tests/test_golden.py`` (only before a move, never to make a failure pass).
The machine-independent check, which runs (never skips) on every x86 CPU, is ``test_golden_portable.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

from mosaic.pipeline import Options, run

GOLDEN = Path(__file__).with_name("golden.json")
CASES = {
    "magnitude": dict(prune_method="magnitude"),
    "wanda": dict(prune_method="wanda"),
    "wanda_owl": dict(prune_method="wanda_owl", sparsity_ratio=0.6),
    "wanda_search": dict(prune_method="wanda_search", sparsity_ratio=0.6, search_budget=2, search_windows=2),
    "sparsegpt": dict(prune_method="sparsegpt"),
    "sparsegpt_mosaic": dict(prune_method="sparsegpt_mosaic", sparsity_ratio=0.6),
    "sparsegpt_2:4": dict(prune_method="sparsegpt", sparsity_type="2:4"),
    "sparsegpt_composite": dict(prune_method="sparsegpt_mosaic", sparsity_type="composite",
                                sparsity_ratio=0.6, structured_ratio=0.3),
    "alps": dict(prune_method="alps", sparsity_ratio=0.7, alps_max_iter=12),
    "magnitude_mosaic_streamed": dict(prune_method="magnitude_mosaic", offload="disk"),
    "wanda_streamed": dict(prune_method="wanda", offload="disk"),
    "sparsegpt_mosaic_streamed": dict(prune_method="sparsegpt_mosaic", sparsity_ratio=0.6, offload="disk"),
    "sparsegpt_2:4_streamed": dict(prune_method="sparsegpt", sparsity_type="2:4", offload="disk"),
}


def fingerprint() -> str:
    import transformers

    info = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "flags") and key.strip() not in info:
            info[key.strip()] = value.strip()
    info.update(torch=torch.__version__, transformers=transformers.__version__,
                threads=torch.get_num_threads())
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


def tensors_hash(directory: Path) -> str:
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    digest = hashlib.sha256()
    for file in files:
        for name, t in sorted(load_file(directory / file).items()):
            digest.update(name.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
            digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def json_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """3-layer tiny LLaMA (tied) and Qwen2 (biases, GQA), sharded so that streaming reads several files."""
    out = {}
    for family in ("llama", "qwen2"):
        d = tmp_path_factory.mktemp(f"golden-{family}")
        tiny_model(family, layers=3).save_pretrained(d, max_shard_size="200KB")
        tokenizer.save_pretrained(d)
        out[family] = d
    return out


def golden_run(model: Path, calib: Path, out: Path, case: dict) -> dict:
    opts = dict(model=str(model), nsamples=8, seqlen=48, calib_batch_size=4, calib_dataset=str(calib),
                eval_datasets="none", seed=1, save_model=str(out), **case)
    results = run(Options(**opts))
    return {"weights": tensors_hash(out), "sparsity": json_hash(results["sparsity"])}


def recorded() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("name", list(CASES))
def test_golden(tmp_path, checkpoints, calib_file, family, name):
    got = golden_run(checkpoints[family], calib_file, tmp_path / "out", CASES[name])
    machine, key = fingerprint(), f"{family}/{name}"
    if os.environ.get("MOSAIC_GOLDEN") == "record":
        doc = recorded()
        doc.setdefault(machine, {})[key] = got
        GOLDEN.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        return
    want = recorded().get(machine, {}).get(key)
    if want is None:
        pytest.skip(f"no golden hashes recorded for this machine ({machine}) and case {key}")
    assert got == want, f"{key}: the pruned model or its sparsity report changed"
