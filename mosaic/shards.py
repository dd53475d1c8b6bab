"""Safetensors shards, read and written one part of a model at a time: ``ShardSource`` reads only the
tensors a part needs (plain reads, no memory map; sizes checked against each file's header before any
work, so a truncated file fails in one line instead of hanging), ``write_shard`` writes one durably, and
``write_index`` the index that ties them into one checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from mosaic.errors import OptionError
from mosaic.export import fsync_path, replace_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class ShardSource:
    """The tensors of a safetensors checkpoint (one file or shards with an index), read on demand."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if (self.directory / INDEX).is_file():
            weight_map = json.loads((self.directory / INDEX).read_text())["weight_map"]
            self.files = {name: self.directory / file for name, file in weight_map.items()}
        elif (self.directory / SINGLE).is_file():
            self.files = dict.fromkeys(_header(self.directory / SINGLE)[0], self.directory / SINGLE)
        else:
            raise OptionError("offload", f"{self.directory} holds no safetensors weights ({SINGLE} or "
                              f"{INDEX}); streaming reads safetensors checkpoints only")
        for file in dict.fromkeys(self.files.values()):
            check_shard(file)

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The named tensors, floating ones as ``dtype``. Read with plain file reads into fresh tensors
        rather than through a memory map, so the file's pages never count in this process's RSS; a tensor
        stored in another floating dtype is read and converted ``READ_CHUNK`` bytes at a time into its
        destination, never whole beside it. The heap's freed pages go back to the OS first: tokenizing the
        calibration text leaves a few hundred MB of them, which the embedding would otherwise come on top
        of."""
        missing = [n for n in names if n not in self.files]
        if missing:
            raise OptionError("model", f"{self.directory} lacks tensor {missing[0]}")
        return_freed_memory()
        out = {}
        for file in dict.fromkeys(self.files[n] for n in names):
            header, base = _header(file)
            with open(file, "rb", buffering=0) as f:
                for n in names:
                    if self.files[n] != file:
                        continue
                    info = header[n]
                    start, end = info["data_offsets"]
                    stored = _DTYPES[info["dtype"]]
                    t = torch.empty(info["shape"], dtype=dtype if stored.is_floating_point else stored)
                    if end > start:
                        f.seek(base + start)
                        _read_as(f, t, stored, f"{file} ends inside tensor {n}")
                    out[n] = t
        return out

    def nbytes(self, dtype: torch.dtype) -> int:
        """What the weights take in memory as ``dtype`` (floating tensors; others as stored)."""
        total = 0
        for file in set(self.files.values()):
            for info in _header(file)[0].values():
                stored = _DTYPES[info["dtype"]]
                numel = 1
                for d in info["shape"]:
                    numel *= d
                total += numel * (dtype.itemsize if stored.is_floating_point else stored.itemsize)
        return total


READ_CHUNK = 2**22  # bytes read at a time when a tensor's stored dtype differs from the run's


def _read_as(f, t: torch.Tensor, stored: torch.dtype, truncated: str) -> None:
    """Fill ``t`` from ``f``'s next ``t.numel()`` values of dtype ``stored``: straight into its memory, or
    through a ``READ_CHUNK`` buffer converted slice by slice (``copy_`` casts exactly as ``to`` does)."""
    flat = t.view(-1)
    if stored == t.dtype:
        _read_exactly(f, flat, truncated)
        return
    step = max(1, READ_CHUNK // stored.itemsize)
    buffer = torch.empty(min(step, flat.numel()), dtype=stored)
    for start in range(0, flat.numel(), step):
        part = buffer[:min(step, flat.numel() - start)]
        _read_exactly(f, part, truncated)
        flat[start:start + part.numel()].copy_(part)


def _read_exactly(f, t: torch.Tensor, truncated: str) -> None:
    """Read exactly ``t``'s bytes from ``f`` into it (a contiguous 1-D tensor)."""
    view = memoryview(t.view(torch.uint8).numpy())
    got = 0
    while got < len(view):
        count = f.readinto(view[got:])
        if not count:
            raise OptionError("model", f"{truncated}: the file is truncated; re-download or re-save the "
                              "checkpoint")
        got += count


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _header(file: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data offsets) and where its data begins."""
    try:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if 8 + size > os.fstat(f.fileno()).st_size:
                raise ValueError(f"its header claims {size} bytes")
            header = json.loads(f.read(size))
    except FileNotFoundError as e:
        raise OptionError("model", f"{file} is missing; re-download or re-save the checkpoint") from e
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise OptionError("model", f"{file} is not a readable safetensors file ({e}); re-download or "
                          "re-save the checkpoint") from e
    header.pop("__metadata__", None)
    return header, 8 + size


def check_shard(file: Path) -> None:
    """Refuse, before any work, a safetensors file whose size is not what its header describes (a copy or
    download cut short): reading it would fail, or worse, hours into a run."""
    header, base = _header(file)
    expected = base + max((info["data_offsets"][1] for info in header.values()), default=0)
    size = file.stat().st_size
    if size != expected:
        what = "truncated" if size < expected else "longer than its header describes"
        raise OptionError("model", f"{file} is {what} ({size} bytes, its header describes {expected}); "
                          "re-download or re-save the checkpoint")


def shard_name(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors shard, atomically (a killed run leaves the old file or none, never half of one) and
    durably (on disk before its name is: a progress record written after it never names lost data).
    Written straight from the tensors' memory: ``safetensors.torch.save_file`` first copies every tensor
    into a bytes object, which would double a layer's footprint while it is written."""
    codes = {t: c for c, t in _DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for t in tensors.values():
                if t.numel():
                    f.write(memoryview(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()))

    replace_file(path, write, durable=True)


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS: glibc serves the next layer-sized blocks from a heap that
    otherwise only grows (RSS grew by about a layer per layer streamed)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a second name of ``source`` (no bytes copied), or a durable copy where the file
    system cannot link; either way ``source`` stays."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
        fsync_path(target)


def write_index(directory: Path, shards: list[str]) -> dict:
    """``model.safetensors.index.json`` as ``save_pretrained`` writes it, from the shards' headers."""
    weight_map, size, params = {}, 0, 0
    for shard in shards:
        for n, info in _header(directory / shard)[0].items():
            weight_map[n] = shard
            start, end = info["data_offsets"]
            size += end - start
            numel = 1
            for d in info["shape"]:
                numel *= d
            params += numel
    index = {"metadata": {"total_parameters": params, "total_size": size}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index
