"""Every calibration window role is drawn by one function and no two roles share a token."""

from __future__ import annotations

import itertools

import pytest
import torch

from mosaic import data
from mosaic.load import resolve_calib_dtype


class PositionTokenizer:
    """Token id = position in the text (one token per word): a window's ids are its token offsets, so
    overlap between windows is overlap of their id sets. Only the drawing logic is under test here."""

    model_max_length = 10**6

    def __call__(self, text: str):
        class Ids:
            input_ids = list(range(len(text.split())))

        return Ids()


@pytest.fixture
def words(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text(" ".join(f"w{i}" for i in range(20_000)))
    return str(path)


def offsets(windows: torch.Tensor) -> set[int]:
    return set(windows.flatten().tolist())


def test_every_role_is_disjoint_from_every_other(words):
    counts = {"statistics": 16, "search": 4, "validation": 4, "distill": 12, "distill_held_out": 2,
              "selection": 6}
    roles = data.draw_windows(PositionTokenizer(), words, 64, 0, counts)
    assert {r: w.shape[0] for r, w in roles.items()} == counts
    for a, b in itertools.combinations(counts, 2):
        assert not offsets(roles[a]) & offsets(roles[b]), (a, b)
    again = data.draw_windows(PositionTokenizer(), words, 64, 0, counts)
    assert all(torch.equal(roles[r], again[r]) for r in counts)  # deterministic for a seed


def test_a_benchmarks_selection_windows_miss_every_run_it_compares(words):
    """bench_recover.py chooses knobs on ``selection`` windows drawn after the largest distillation any of
    its jobs runs: they share no token with the statistics, training or held-out windows of smaller ones
    (the draws are prefixes), unlike the windows right after the statistics, which a run trains on."""
    run = data.draw_windows(PositionTokenizer(), words, 64, 0,
                            {"statistics": 8, "distill": 16, "distill_held_out": 2})
    bench = data.draw_windows(PositionTokenizer(), words, 64, 0,
                              {"statistics": 8, "distill": 32, "distill_held_out": 4, "selection": 4})
    used = set().union(*(offsets(w) for w in run.values()))
    assert not offsets(bench["selection"]) & used
    first_after_statistics = data.calibration_windows(PositionTokenizer(), words, 8, 64, 0, held_out=4)[8:]
    assert offsets(first_after_statistics) <= offsets(run["distill"])  # what the old choice scored on


def test_the_statistics_windows_are_the_reference_codes_whatever_else_is_drawn(words):
    alone = data.calibration_windows(PositionTokenizer(), words, 8, 64, 3)
    roles = data.draw_windows(PositionTokenizer(), words, 64, 3, {"statistics": 8, "distill": 5})
    assert torch.equal(alone, roles["statistics"])
    with pytest.raises(ValueError, match="unknown window roles"):
        data.draw_windows(PositionTokenizer(), words, 64, 3, {"training": 2})


def test_calibration_precision_auto_is_the_models_own_dtype_on_every_cpu(monkeypatch):
    """auto used to mean bf16 forwards for an fp32 model on CPUs with native bf16 (and fp32 elsewhere), so
    the same command built different models on different machines."""
    from mosaic import load

    monkeypatch.setattr(load, "cpu_has_native_bf16", lambda: True, raising=False)
    for dtype in (torch.float32, torch.bfloat16):
        assert resolve_calib_dtype("auto", dtype, torch.device("cpu")) == dtype
    assert resolve_calib_dtype("bfloat16", torch.float32, torch.device("cpu")) == torch.bfloat16
