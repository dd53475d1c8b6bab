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
              "selection": 6, "guard": 3}
    roles = data.draw_windows(PositionTokenizer(), words, 64, 0, counts, guard=words)
    assert {r: w.shape[0] for r, w in roles.items()} == counts
    for a, b in itertools.combinations(counts, 2):
        assert not offsets(roles[a]) & offsets(roles[b]), (a, b)
    again = data.draw_windows(PositionTokenizer(), words, 64, 0, counts, guard=words)
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


# --- weighted mixtures -----------------------------------------------------------------------------------

class WordTokenizer:
    """Token id = the number in each word ``wN``: two files with disjoint numbers never share an id, so
    window overlap across sources and roles is id overlap."""

    model_max_length = 10**6

    def __call__(self, text: str, add_special_tokens: bool = True):
        class Ids:
            input_ids = [int(w[1:]) for w in text.split()]

        return Ids()


@pytest.fixture
def two_texts(tmp_path) -> tuple[str, str]:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(" ".join(f"w{i}" for i in range(20_000)))
    b.write_text(" ".join(f"w{i}" for i in range(100_000, 110_000)))
    return str(a), str(b)


@pytest.mark.parametrize("total, weights, expected", [
    (10, [1, 1, 1], [4, 3, 3]),  # 3.33 each: the one left goes to the first on the tie
    (7, [2, 1], [5, 2]),  # 4.67 / 2.33: floors 4 + 2, the remainder to the larger fraction
    (8, [0.7, 0.2, 0.1], [6, 1, 1]),  # 5.6 / 1.6 / 0.8: floors 5 + 1 + 0, then .8 and .6 win
    (0, [1, 3], [0, 0]),
])
def test_windows_split_by_largest_remainder(total, weights, expected):
    assert data.split_count(total, weights) == expected


def test_split_is_exact_for_any_total_and_weights():
    import random

    rng = random.Random(0)
    for _ in range(500):
        weights = [rng.uniform(0.01, 5) for _ in range(rng.randint(1, 6))]
        total = rng.randint(0, 300)
        counts = data.split_count(total, weights)
        assert sum(counts) == total
        assert all(abs(c - total * w / sum(weights)) < 1 for c, w in zip(counts, weights))


def test_a_mixture_draws_each_sources_share_disjoint_and_deterministic(two_texts):
    a, b = two_texts
    spec = f"{a}:3,{b}:1"
    counts = {"statistics": 8, "search": 4, "validation": 4, "distill": 8, "distill_held_out": 2,
              "selection": 4, "guard": 2}
    roles = data.draw_windows(WordTokenizer(), spec, 32, 5, counts, guard=b)  # the guard: b's whole count
    per = data.source_counts(spec, counts, guard=b)
    assert per[a]["guard"] == 0 and per[b]["guard"] == 2
    assert per[a]["statistics"] == 6 and per[b]["statistics"] == 2 and per[a]["distill_held_out"] == 2
    for role, windows in roles.items():
        from_b = int((windows[:, 0] >= 100_000).sum())
        assert windows.shape[0] == counts[role] and from_b == per[b][role], role
    for x, y in itertools.combinations(counts, 2):
        assert not offsets(roles[x]) & offsets(roles[y]), (x, y)
    again = data.draw_windows(WordTokenizer(), spec, 32, 5, counts, guard=b)
    assert all(torch.equal(roles[r], again[r]) for r in counts)
    other_seed = data.draw_windows(WordTokenizer(), spec, 32, 6, counts, guard=b)
    assert not torch.equal(roles["statistics"], other_seed["statistics"])


def test_one_source_with_a_weight_is_that_source(two_texts):
    a, _ = two_texts
    counts = {"statistics": 6, "distill": 3}
    plain = data.draw_windows(WordTokenizer(), a, 32, 1, counts)
    weighted = data.draw_windows(WordTokenizer(), f"{a}:2.5", 32, 1, counts)
    assert all(torch.equal(plain[r], weighted[r]) for r in data.ROLES)


def test_distillation_can_come_from_another_mixture_and_stays_disjoint(two_texts):
    a, b = two_texts
    counts = {"statistics": 8, "distill": 6, "distill_held_out": 2}
    roles = data.draw_windows(WordTokenizer(), a, 32, 0, counts, distill=f"{a}:1,{b}:1")
    assert int((roles["statistics"][:, 0] >= 100_000).sum()) == 0  # statistics: the calibration text only
    assert int((roles["distill"][:, 0] >= 100_000).sum()) == 3
    assert not offsets(roles["statistics"]) & (offsets(roles["distill"]) | offsets(roles["distill_held_out"]))


@pytest.mark.parametrize("spec, says", [
    ("{a}:abc", "weight 'abc'"), ("{a}:0", "weight '0'"), ("{a}:-1", "weight '-1'"),
    ("{a}:inf", "weight 'inf'"),
    ("{a},,{b}", "empty entry"), ("{a}:1,{a}:2", "appears twice"), ("{a}:1000,{b}:1", "gets no calibration"),
])
def test_bad_mixtures_are_refused(two_texts, spec, says):
    from mosaic.errors import OptionError

    a, b = two_texts
    with pytest.raises(OptionError) as err:
        data.draw_windows(WordTokenizer(), spec.format(a=a, b=b), 32, 0, {"statistics": 4})
    assert err.value.option == "calib_dataset" and says in err.value.message, err.value.message


def test_bad_mixtures_and_chat_records_are_one_line_cli_errors(tmp_path, tiny_dirs, calib_file):
    from conftest import run_cli

    short = tmp_path / "short.txt"
    short.write_text("too short")
    bad_chat = tmp_path / "chat.jsonl"
    bad_chat.write_text('{"messages": [{"role": "user"}]}\n')
    for spec, says in ((f"{calib_file}:0", "weight '0'"),
                       (f"{calib_file},nope.txt", "unknown dataset 'nope.txt'"),
                       (f"{calib_file},{short}", "one window"), (str(bad_chat), "record 0")):
        proc = run_cli("--model", str(tiny_dirs["llama"]), "--calib_dataset", spec, "--eval_datasets", "none",
                       "--nsamples", "4", "--seqlen", "32", "--save", str(tmp_path / "out"))
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr[-800:]
        assert "--calib_dataset" in proc.stderr and says in proc.stderr, proc.stderr
        assert not (tmp_path / "out").exists()


def test_a_run_reports_its_mixture(tmp_path, tiny_dirs, calib_file):
    from mosaic.pipeline import Options, run

    other = tmp_path / "other.txt"
    other.write_text(calib_file.read_text()[::-1])
    r = run(Options(model=str(tiny_dirs["llama"]), calib_dataset=f"{calib_file}:3,{other}:1", nsamples=8,
                    seqlen=32, calib_batch_size=4, eval_datasets="none", prune_method="wanda",
                    calib_dtype="float32"))
    sources = r["calibration"]["sources"]
    assert [(s["weight"], s["windows"]["statistics"], s["tokens"]) for s in sources] == [(3.0, 6, 192),
                                                                                        (1.0, 2, 64)]


# --- chat records --------------------------------------------------------------------------------------

CHATS = [[{"role": "user", "content": "What is pruning?"},
          {"role": "assistant", "content": "Removing weights that matter least."}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
          {"role": "assistant", "content": "Seven."}]]


@pytest.mark.e2e
def test_chat_records_render_through_the_default_models_own_template(tmp_path):
    """The SmolLM2-Instruct tokenizer (the default model's): the stream is exactly its own
    apply_chat_template of each conversation, one after another."""
    import json

    from transformers import AutoTokenizer

    from mosaic.load import DEFAULT_MODEL, resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL, "llm_weights"))
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    stream = data.token_stream(tokenizer, data.load_text(str(path), "calib"), "calib_dataset")
    own = [i for m in CHATS for i in tokenizer.apply_chat_template(m, tokenize=True)["input_ids"]]
    assert stream.tolist() == own
    assert "<|im_start|>assistant" in data.render_chats(tokenizer, data.load_text(str(path), "calib"), "x")


def test_chat_records_need_a_template(tmp_path, tokenizer):
    import json

    from mosaic.errors import OptionError

    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    with pytest.raises(OptionError, match="no chat template"):
        data.token_stream(tokenizer, data.load_text(str(path), "calib"), "calib_dataset")


def test_several_texts_are_each_their_own_run_exactly_and_their_geometric_mean_is_reported(
        tmp_path, tiny_dirs, calib_file):
    """Evaluating several texts in one run gives each exactly the perplexity of a run on it alone."""
    import math

    from mosaic.pipeline import Options, run

    other = tmp_path / "other.txt"
    other.write_text(calib_file.read_text()[::-1])
    base = dict(model=str(tiny_dirs["qwen2"]), calib_dataset=str(calib_file), nsamples=4, seqlen=32,
                calib_batch_size=2, prune_method="wanda", calib_dtype="float32", eval_seqlen=64,
                eval_windows=3)
    both = run(Options(**base, eval_datasets=f"{calib_file},{other}", save=str(tmp_path / "both")))
    alone = [run(Options(**base, eval_datasets=str(name)))["perplexity"][str(name)]["ppl"]
             for name in (calib_file, other)]
    assert [both["perplexity"][str(n)]["ppl"] for n in (calib_file, other)] == alone
    assert both["perplexity_geomean"] == pytest.approx(math.sqrt(alone[0] * alone[1]), rel=1e-12)
    assert "geometric mean of the 2 texts" in (tmp_path / "both" / "summary.txt").read_text()
