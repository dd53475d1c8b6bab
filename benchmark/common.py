"""Shared helpers for the benchmark scripts: run main.py in a fresh process, describe the machine, and keep
a resumable sweep's finished jobs in ``results/<name>_runs.jsonl``."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmark" / "results"

# the yardstick settings from the developers' guide
YARDSTICK = ["--nsamples", "32", "--seqlen", "512", "--eval_windows", "16"]


def cpu_isa() -> str:
    """What separates two CPUs that report the same model name ("AMD EPYC"): the vector units and whether
    bf16 is native (a bf16 matmul is ~50x slower without it). Times compare only within one of these."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown ISA"
    first = info.split("\n\n")[0].splitlines()  # the first logical CPU
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first if ":" in line)}
    flags = set(fields.get("flags", "").split())
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    bf16 = "native bf16" if {"avx512_bf16", "amx_bf16"} & flags else "no native bf16"
    return f"{vector}, {bf16}, family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"


# rows from before 2026-12-03 record no ISA: they all ran on this AVX2 EPYC; later rows name their CPU
OLD_CPU = "AMD EPYC (AVX2, no native bf16)"


def cpu_label(m: dict) -> str:
    """The CPU a row ran on, as rows record it: model name and ISA."""
    return f"{m['cpu']} ({m['isa']})"


def cpu_letters(labels: Iterable[str]) -> dict[str, str]:
    """A letter for each CPU seen in a table's rows, A for the oldest (the one whose rows record no ISA)."""
    order = sorted(dict.fromkeys(labels), key=lambda c: c != OLD_CPU)
    return {c: chr(ord("A") + i) for i, c in enumerate(order)}


def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info = {"cpu": cpu, "isa": cpu_isa(), "cores": os.cpu_count(), "ram_gib": round(mem, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d")}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def run_main(args: list[str], timeout: int = 3600) -> dict:
    """Run one pruning job in a fresh process and return its results.json."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, str(ROOT / "main.py"), *args, "--save", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
        return json.loads((out / "results.json").read_text())


def machine_line(m: dict) -> str:
    return (f"{m['cpu']}" + (f" ({m['isa']})" if m.get("isa") else "")
            + f", {m['cores']} cores, {m['ram_gib']} GiB RAM"
            + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
            + f"; Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads), "
            f"transformers {m.get('transformers')}; {m['date']}")


def write(name: str, markdown: str, data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(markdown)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    print(markdown)


def read_runs(path: Path) -> list[dict]:
    """A sweep's finished jobs, one JSON row a line, in the order they ran (none before its first job)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished(path: Path, key: Callable[[dict], Hashable]) -> dict:
    """The finished jobs by cell, so that a resumed sweep skips them; a cell run twice keeps its last row."""
    return {key(r): r for r in read_runs(path)}


def append(path: Path, row: dict) -> None:
    """Record a job the moment it finishes: an interrupted sweep loses only the job it was running."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def parse_only(argv: list[str]) -> set[str] | None:
    """``--only=a,b``: the cells to run, named as each script names them; None (no flag): the whole grid."""
    only = next((a.split("=", 1)[1] for a in argv if a.startswith("--only=")), None)
    return None if only is None else set(only.split(","))


def not_measured(missing: list[str], runs: Path, label: str = "Not measured (yet)",
                 why: str = "") -> list[str]:
    """The report's note on the cells a cut-short sweep left, so that a partial table never passes for a whole
    one; ``why`` replaces the default "the sweep resumes from" sentence."""
    if not missing:
        return []
    why = why or f"The sweep resumes from `results/{runs.name}`."
    return ["", f"**{label}**: {', '.join(missing)}. {why}"]


def notes(name: str) -> list[str]:
    """The hand-written ``results/<name>_notes.md`` under a report, so that rebuilding the table keeps it."""
    path = RESULTS / f"{name}_notes.md"
    return ["", path.read_text().strip()] if path.exists() else []
