"""Write outputs so that nothing is ever half-written or silently overwritten.

Every output directory is built under a temporary sibling and renamed into place at the very end;
a failure removes the temporary directory and leaves any earlier result untouched. Whatever must wait
until the new directory is in place (removing the only other copy of its contents) is registered with
``after_commit``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from torch import nn

from mosaic.errors import OptionError


def check_writable(path: str | os.PathLike | None, option: str, overwrite: bool) -> None:
    """Fail before any work if an output directory exists (without --overwrite) or could not be
    written: a temporary directory is created and removed where it will go."""
    if path is None:
        return
    p = Path(path)
    if p.exists() and not overwrite:
        raise OptionError(option, f"{p} already exists; pass --overwrite to replace it or choose another "
                          "directory")
    if p.exists() and not p.is_dir():
        raise OptionError(option, f"{p} exists and is not a directory")
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OptionError(option, f"{parent} is not a directory, so {p} cannot be created there")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{p.name}.probe-", dir=parent))
    except OSError as e:
        raise OptionError(option, f"cannot write in {parent} ({e.strerror or e}); choose a writable "
                          "directory") from e


# open atomic_dir temporaries -> their after_commit actions
_PENDING: dict[Path, list[Callable[[], None]]] = {}


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``path`` when the block succeeds; then run what
    ``after_commit`` registered for it (dropped when the block fails)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    actions = _PENDING[tmp.absolute()] = []
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise OptionError("overwrite",
                                  f"{final} appeared while this run was writing; nothing replaced")
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _PENDING.pop(tmp.absolute(), None)
    for action in actions:
        action()


def after_commit(path: str | os.PathLike, action: Callable[[], None]) -> None:
    """Run ``action`` once ``path`` is in its final place: after the ``atomic_dir`` whose temporary directory
    holds ``path`` is renamed into place (never, if it fails), or now when no open ``atomic_dir`` holds it.
    For removing the source of what was linked or copied into ``path``: a failure first keeps it."""
    p = Path(path).absolute()
    for tmp, actions in _PENDING.items():
        if p == tmp or tmp in p.parents:
            actions.append(action)
            return
    action()


def write_json(path: str | os.PathLike, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=_jsonable)
        f.write("\n")


def replace_file(path: str | os.PathLike, write, durable: bool = False) -> None:
    """Write a file atomically: ``write(tmp_path)`` fills a temporary sibling that then replaces ``path``,
    so a reader (or a crash) sees the old file or the new one, never half of one. ``durable``: the data
    is on disk before the rename publishes it, and the rename itself once this returns (a power loss
    cannot leave a published name with missing data)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_path(path.parent)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a directory's entries, to disk (a file system that cannot sync a directory
    says EINVAL: nothing to do there)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL or not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, set | tuple):
        return list(x)
    return str(x)


def make_serializable(model: nn.Module) -> None:
    """A model loaded from GGUF holds de-quantized dense weights but keeps a GGUF quantizer marker
    that makes transformers 5 refuse to save it. Drop the marker (the weights are already dense)."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if getattr(model, attr, None):
            with suppress(AttributeError):
                setattr(model, attr, None)


def save_checkpoint(model: nn.Module, tokenizer, directory: Path, manifest: dict) -> int:
    """safetensors weights + config + tokenizer + mosaic.json; returns the weight bytes on disk."""
    make_serializable(model)
    use_cache, model.config.use_cache = model.config.use_cache, True  # pruning turns it off
    try:
        model.save_pretrained(directory, safe_serialization=True)
    finally:
        model.config.use_cache = use_cache
    tokenizer.save_pretrained(directory)
    if getattr(model.config, "auto_map", None):  # per-layer widths: ship the modeling code the config names
        from mosaic.modeling import MODELING_FILE

        shutil.copy(MODELING_FILE, directory / MODELING_FILE.name)
    write_json(directory / "mosaic.json", manifest)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def _inside(inner: str, outer: str) -> Path | None:
    try:
        return Path(inner).resolve().relative_to(Path(outer).resolve())
    except ValueError:
        return None


def write_outputs(save, save_model, overwrite, write_results, write_model) -> None:
    """--save and --save_model, each atomic; one nested inside the other is written in one go."""
    if save and save_model and (rel := _inside(save_model, save)) is not None:
        with atomic_dir(save, overwrite) as tmp:
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            write_model(tmp / rel)
            write_results(tmp)
        return
    if save and save_model and (rel := _inside(save, save_model)) is not None:
        with atomic_dir(save_model, overwrite) as tmp:
            write_model(tmp)
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            write_results(tmp / rel)
        return
    if save_model:
        with atomic_dir(save_model, overwrite) as tmp:
            write_model(tmp)
    if save:
        with atomic_dir(save, overwrite) as tmp:
            write_results(tmp)
