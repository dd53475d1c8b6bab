"""Real parts for fast tests: tiny random LLaMA / Mistral / Qwen2 models saved as HF checkpoints,
with a real byte-level BPE tokenizer trained on the offline Wikipedia text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("llama", "mistral", "qwen2")
VOCAB = 512

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_config(family: str, layers: int = 2):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=family != "mistral")
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, layers: int = 2):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers), dtype=torch.float32).eval()
    with torch.no_grad():  # random init gives near-uniform outputs; spread the weights a little
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):  # Qwen2's q/k/v biases; norms keep their ones
                p.normal_(0, 0.02)
    model.config.use_cache = False
    return model


@pytest.fixture(scope="session")
def wiki_texts() -> list[str]:
    from mosaic.data import load_text

    return load_text("wiki-offline", "calib").texts[:1500]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, wiki_texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(wiki_texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    return fast


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """family -> directory with a saved tiny checkpoint and tokenizer."""
    out = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(f"tiny-{family}")
        tiny_model(family).save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[family] = d
    return out


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory, wiki_texts) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("\n\n".join(wiki_texts[:400]))
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real entry point, in a fresh process."""
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
