"""Mustafar KV-cache sparsity: criteria, bitmap format, pruning cache and teacher-forced attention."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from mosaic.kv import KVSparsity, MustafarCache, compress, decompress, kv_bytes, mustafar_attention, nbytes
from mosaic.kv.cache import MustafarLayer, _Stream
from mosaic.kv.format import stream_nbytes
from mosaic.kv.prune import per_channel, per_token, pruned_before

HEAD_DIM = 16  # tiny models


def prompt(batch: int = 2, length: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def decode_step_by_step(model, ids: torch.Tensor, prefill: int, spec: KVSparsity, cache: Cache | None = None,
                        **cache_kwargs) -> tuple[torch.Tensor, Cache]:
    """Logits of every position: the first ``prefill`` tokens in one forward, then one token at a time."""
    cache = cache if cache is not None else MustafarCache(model.config, spec, **cache_kwargs)
    with torch.no_grad():
        logits = [model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
        for t in range(prefill, ids.shape[1]):
            logits.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1), cache


def teacher_forced(model, ids: torch.Tensor, spec: KVSparsity, prompt_len: int = 0) -> torch.Tensor:
    with torch.no_grad(), mustafar_attention(model, spec, prompt_len):
        return model(ids).logits


# ---------------------------------------------------------------- criteria

@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7])
def test_per_token_prunes_exactly_round_s_d_smallest_and_keeps_the_rest(sparsity):
    x = torch.randn(2, 3, 10, 64)
    y = per_token(x, sparsity)
    pruned = y == 0
    assert (pruned.sum(-1) == round(sparsity * 64)).all()
    assert torch.equal(y[~pruned], x[~pruned])  # survivors unchanged, no rescaling
    kept_min = x.abs().masked_fill(pruned, float("inf")).amin(-1)
    pruned_max = x.abs().masked_fill(~pruned, -1).amax(-1)
    assert (kept_min >= pruned_max).all()


def test_per_token_breaks_ties_towards_the_lower_index():
    x = torch.tensor([[[[3.0, -1.0, 1.0, 2.0, -1.0, 5.0, 1.0, 0.5]]]])
    # |x| = 3 1 1 2 1 5 1 .5: prune 4 = the .5 and the first three 1s (indices 1, 2, 4)
    assert torch.equal(per_token(x, 0.5), torch.tensor([[[[3.0, 0, 0, 2.0, 0, 5.0, 1.0, 0]]]]))


def test_reference_mode_reproduces_the_official_off_by_one():
    x = torch.randn(1, 2, 5, 64)
    # official: k = max(1, int(s·64)), keep |x| ≥ k-th smallest -> k - 1 pruned
    assert ((per_token(x, 0.7, reference=True) == 0).sum(-1) == 43).all()  # int(44.8) - 1, exact mode: 45
    assert ((per_token(x, 0.5, reference=True) == 0).sum(-1) == 31).all()
    assert torch.equal(per_token(x, 0.0, reference=True), x)


def test_per_channel_prunes_within_each_channel_of_each_token_group():
    x = torch.tensor([[[[1.0, -8.0], [4.0, 7.0], [-2.0, 6.0], [3.0, -5.0],
                        [9.0, 1.0], [-1.0, 2.0], [0.5, -3.0], [8.0, 4.0]]]])
    expected = torch.tensor([[[[0.0, -8.0], [4.0, 7.0], [0.0, 0.0], [3.0, 0.0],
                               [9.0, 0.0], [0.0, 0.0], [0.0, -3.0], [8.0, 4.0]]]])
    assert torch.equal(per_channel(x, 0.5, group=4), expected)
    with pytest.raises(ValueError):
        per_channel(x[..., :6, :], 0.5, group=4)


def test_pruned_before_leaves_window_plus_the_new_token_dense():
    assert [pruned_before(p, window=3) for p in range(7)] == [0, 0, 0, 0, 1, 2, 3]
    assert [pruned_before(p, 3, "per_channel", group=2) for p in range(9)] == [0, 0, 0, 0, 0, 2, 2, 4, 4]


# ---------------------------------------------------------------- bitmap format

@pytest.mark.parametrize("layout", ["k", "v"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 16), (2, 2, 37, 16), (1, 3, 64, 64), (2, 1, 130, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compress_decompress_is_lossless(layout, shape, dtype):
    x = per_token(torch.randn(shape), 0.7).to(dtype)
    for dense in (x, torch.zeros_like(x), torch.randn(shape).to(dtype)):  # pruned, all zero, no zero
        c = compress(dense, layout)
        back = decompress(c)
        assert back.dtype == dtype and torch.equal(back, dense)


def test_bitmap_values_and_offsets_follow_the_layout():
    v = torch.zeros(1, 1, 1, 64)
    v[..., [0, 5, 63]] = torch.tensor([1.5, -2.0, 3.0])
    c = compress(v, "v")
    assert c.bitmaps.tolist() == [[-(2 ** 63) + 2 ** 58 + 1]]  # bits 63, 58, 0 of a uint64
    assert c.values.tolist() == [1.5, -2.0, 3.0, 0, 0, 0, 0, 0]  # padded to 8
    assert c.accum.tolist() == [[0, 4]] and c.offsets.tolist() == [0]  # in units of 2 values
    k = torch.zeros(1, 2, 64, 1)  # K is channel-major: one tile holds 64 tokens of a channel
    k[0, 0, 1, 0], k[0, 1, 2, 0] = 1.0, 2.0
    ck = compress(k, "k")
    assert ck.bitmaps.tolist() == [[2 ** 62], [2 ** 61]]
    assert ck.offsets.tolist() == [0, 8] and ck.values.tolist() == [1.0] + [0] * 7 + [2.0] + [0] * 7


def test_nbytes_equals_the_formula_on_a_hand_computed_case():
    # V, fp16, 2 heads × 3 tokens × head_dim 64 at 70 %: every tile keeps 19 nonzeros, padded to 24.
    # per stream: 3 bitmaps (24 B) + 4 prefix sums (16 B) + offset (4 B) = 44 B; values 3·24·2 = 144 B
    x = per_token(torch.randn(1, 2, 3, 64), 0.7).half()
    c = compress(x, "v")
    assert nbytes(c) == 2 * (44 + 144) == 376
    assert stream_nbytes(torch.full((2, 3), 19), value_bytes=2) == 376
    # K: 3 tokens × 64 channels -> 64 tiles per stream holding 3 entries each (19 nonzero channels per token)
    ck = compress(x, "k")
    tile_nnz = (x != 0).squeeze(0).transpose(1, 2).sum(-1)  # [heads, channels]
    assert nbytes(ck) == stream_nbytes(tile_nnz, 2) == (2 * (64 * 12 + 8)
                                                        + 2 * int(((tile_nnz + 7) // 8 * 8).sum()))


def test_kv_bytes_brackets_real_pruned_caches_and_is_exact_for_values():
    config = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=3, head_dim=64)
    spec = KVSparsity(0.7, 0.5, window=4)
    report = kv_bytes(config, 100, spec, value_bytes=4)
    keys, values = torch.randn(2, 1, 3, 100, 64).unbind(0)  # one batch, 3 heads; ×2 layers below
    k_bytes = 2 * nbytes(compress(per_token(keys[..., :96, :], 0.7), "k"))
    v_bytes = 2 * nbytes(compress(per_token(values[..., :96, :], 0.5), "v"))
    assert report.values[0] == report.values[1] == v_bytes
    assert report.keys[0] <= k_bytes <= report.keys[1]
    assert report.dense == 2 * 100 * 2 * 3 * 64 * 4 and report.window == 2 * 4 * 2 * 3 * 64 * 4


def test_kv_bytes_of_an_allocated_map_sum_its_layers_and_heads():
    config = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=2, head_dim=64)
    one = SimpleNamespace(num_hidden_layers=1, num_key_value_heads=1, head_dim=64)
    spec = KVSparsity(0.5, 0.5, window=4, k_layers=((0.5, 0.75), 0.25), v_layers=(0.5, (0.875, 0.0)))
    got = kv_bytes(config, 100, spec)
    parts = [kv_bytes(one, 100, KVSparsity(k, v, window=4))
             for k, v in ((0.5, 0.5), (0.75, 0.5), (0.25, 0.875), (0.25, 0.0))]
    assert got.keys == tuple(map(sum, zip(*(p.keys for p in parts))))
    assert got.values == tuple(map(sum, zip(*(p.values for p in parts))))
    assert (got.dense, got.window) == (sum(p.dense for p in parts), sum(p.window for p in parts))
    # layer 1 kept one KV head
    composite = kv_bytes(config, 100, KVSparsity(0.5, 0.5, window=4), kv_heads=[2, 1])
    assert composite.dense == 3 * parts[0].dense


def test_per_head_sparsities_prune_each_head_with_its_own_count():
    x = torch.randn(2, 3, 10, 64)
    y = KVSparsity(0.5, 0.5, k_layers=((0.25, 0.5, 0.875),)).keys(x, 0)
    assert (y == 0).sum(-1)[:, :, 0].tolist() == [[16, 32, 56]] * 2
    assert torch.equal(y[:, 1:2], per_token(x[:, 1:2], 0.5))
    with pytest.raises(ValueError, match="layers"):
        KVSparsity(0.5, 0.5, k_layers=(0.5,)).keys(x)  # a map needs the layer
    with pytest.raises(ValueError, match="3 KV heads"):
        KVSparsity(0.5, 0.5, k_layers=((0.5, 0.5),)).keys(x, 0)


# ---------------------------------------------------------------- the cache

@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("length, chunk", [(12, 256), (70, 64)], ids=["staged", "compressed"])
def test_generation_at_sparsity_zero_is_bit_identical_to_dynamic_cache(family, length, chunk):
    model, ids = tiny_model(family), prompt(length=length)
    runs = []
    for cache in (DynamicCache(config=model.config),
                  MustafarCache(model.config, KVSparsity(0, 0, window=4), chunk=chunk)):
        runs.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                                   do_sample=False, past_key_values=cache, output_logits=True,
                                   return_dict_in_generate=True))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert all(torch.equal(a, b) for a, b in zip(runs[0].logits, runs[1].logits))


@pytest.mark.parametrize("length, chunk", [(36, 256), (100, 64)], ids=["staged", "compressed"])
def test_window_stays_dense_and_each_token_is_pruned_once(monkeypatch, length, chunk):
    window, s = 8, 0.7
    arrived, spans = {}, []  # layer -> [(keys, values)] as they entered the cache; (layer, K/V, start, stop)
    prune, update = _Stream.prune, MustafarLayer.update
    current = []

    def record_prune(stream, count):
        spans.append((current[-1], stream.layout, stream.pruned, count))
        return prune(stream, count)

    def checked_update(self, key_states, value_states, *args, **kwargs):
        arrived.setdefault(self, []).append((key_states.clone(), value_states.clone()))
        current.append(self)
        keys, values = update(self, key_states, value_states, *args, **kwargs)
        query = keys.shape[-2] - key_states.shape[-2]  # cache index of the first new token
        cut = max(0, query - window)
        assert self.k_pruned == self.v_pruned == cut
        for i, got in enumerate((keys, values)):
            raw = torch.cat([pair[i] for pair in arrived[self]], dim=-2)
            assert torch.equal(got[..., cut:, :], raw[..., cut:, :])  # window + new tokens: untouched
            old, raw = got[..., :cut, :], raw[..., :cut, :]
            assert ((old == 0).sum(-1) == round(s * HEAD_DIM)).all()  # exactly round(s·D) zeros per vector
            assert torch.equal(old[old != 0], raw[old != 0])  # survivors are the original values
        return keys, values

    monkeypatch.setattr(_Stream, "prune", record_prune)
    monkeypatch.setattr(MustafarLayer, "update", checked_update)
    model, ids = tiny_model("llama"), prompt(length=length)
    _, cache = decode_step_by_step(model, ids, prefill=12, spec=KVSparsity(s, s, window=window), chunk=chunk)

    pruned = length - 1 - window
    assert all(layer.get_seq_length() == length and layer.k_pruned == pruned for layer in cache.layers)
    assert all(len(layer.k.chunks) == len(layer.v.chunks) == pruned // chunk for layer in cache.layers)
    counts = {}
    for layer, which, start, stop in spans:
        for position in range(start, stop):
            counts[layer, which, position] = counts.get((layer, which, position), 0) + 1
    assert set(counts.values()) == {1}  # nothing pruned twice
    assert len(counts) == 2 * 2 * pruned  # 2 layers × keys and values × every aged-out token


def test_cache_stats_report_exact_sparsity_counts_and_bytes():
    model, ids = tiny_model("qwen2"), prompt(length=30)
    _, cache = decode_step_by_step(model, ids, prefill=10, spec=KVSparsity(0.7, 0.5, window=8))
    stats = cache.stats()
    assert stats.k_pruned_tokens == stats.v_pruned_tokens == 2 * (29 - 8)
    assert stats.k_sparsity == round(0.7 * HEAD_DIM) / HEAD_DIM and stats.v_sparsity == 0.5
    assert stats.dense_bytes == 2 * 2 * 30 * 2 * HEAD_DIM * 2 * 4  # layers·K,V·tokens·batch·D·heads·fp32
    # 21 pruned tokens fill no 256-token chunk: all staged, dense, so the cache holds the dense bytes
    assert stats.k_compressed_tokens == stats.k_compressed_bytes == stats.v_compressed_bytes == 0
    assert stats.staging_bytes == 2 * 2 * 21 * 2 * HEAD_DIM * 2 * 4
    assert stats.window_bytes == 2 * 2 * 9 * 2 * HEAD_DIM * 2 * 4
    assert stats.held_bytes == stats.staging_bytes + stats.window_bytes == stats.dense_bytes


def test_cache_refuses_sliding_window_layers():
    config = tiny_config("mistral")
    config.sliding_window = 16
    with pytest.raises(ValueError, match="full-attention"):
        MustafarCache(config, KVSparsity())


# ---------------------------------------------------------------- teacher-forced attention

@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_teacher_forced_at_sparsity_zero_is_bit_identical_to_eager(family):
    model, ids = tiny_model(family), prompt()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        dense = model(ids).logits
    assert torch.equal(teacher_forced(model, ids, KVSparsity(0, 0, window=4)), dense)
    assert model.config._attn_implementation == "eager"  # switched back


ALLOCATED = KVSparsity(0.5, 0.5, window=8, k_layers=((0.25, 0.875), 0.5), v_layers=(0.75, (0.0, 0.625)))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("spec", [KVSparsity(0.7, 0.7, window=8),
                                  KVSparsity(0.7, 0.7, window=8, reference=True),
                                  KVSparsity(0.5, 0.7, window=8, v_method="per_channel", group=4),
                                  ALLOCATED,
                                  KVSparsity(0.5, 0.5, window=8, v_method="per_channel", group=4,
                                             k_layers=(0.75, (0.5, 0.125)), v_layers=((0.25, 0.75), 0.5))],
                         ids=["per_token", "reference", "per_channel_v", "allocated",
                              "allocated_per_channel_v"])
def test_teacher_forced_logits_equal_step_by_step_decoding(family, spec):
    model, ids = tiny_model(family), prompt(length=48)
    prefill = 12  # longer than the window: the prefilled tokens past the window are pruned on the first step
    decoded, _ = decode_step_by_step(model, ids, prefill, spec)
    forced = teacher_forced(model, ids, spec, prompt_len=prefill)
    assert torch.allclose(forced, decoded, rtol=0, atol=2e-5)
    with torch.no_grad():
        assert torch.equal(model(ids[:, :prefill]).logits, decoded[:, :prefill])  # prefill is dense
        dense = model(ids).logits
    assert (dense[:, prefill + 1:] - decoded[:, prefill + 1:]).abs().amax() > 1e-2  # and pruning matters


def additive_mask(batch: int, q_len: int, kv_len: int, padded: int, dtype=torch.float32) -> torch.Tensor:
    """Eager's causal mask [batch, 1, q_len, kv_len], the first ``padded`` keys of row 1 padding."""
    positions = torch.arange(kv_len - q_len, kv_len)[:, None]
    allowed = (torch.arange(kv_len) <= positions).expand(batch, 1, q_len, kv_len).clone()
    allowed[1:, :, :, :padded] = False
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)


@pytest.mark.parametrize("spec", [KVSparsity(0.7, 0.7, window=5), KVSparsity(0.7, 0.0, window=3),
                                  KVSparsity(0.0, 0.5, window=0),
                                  KVSparsity(0.5, 0.5, window=4, k_method="per_channel",
                                             v_method="per_channel", group=4),
                                  KVSparsity(0.5, 0.5, window=6, k_layers=((0.25, 0.875),), v_layers=(0.75,)),
                                  KVSparsity(0.5, 0.7, window=4, v_method="per_channel", group=4)],
                         ids=["kv", "k_only", "v_only", "per_channel", "allocated", "mixed_counts"])
@pytest.mark.parametrize("q_len,prompt_len,masked", [(45, 0, True), (45, 11, True), (9, 0, True),
                                                     (1, 0, False)])
def test_blocked_attention_equals_the_full_products(monkeypatch, spec, q_len, prompt_len, masked):
    """The fused blocks (7 queries each here, so blocks straddle the window and the prompt) give what the
    full [queries × keys] products give, with GQA, padding, a prompt, and fewer queries than keys."""
    from mosaic.kv import attention

    gen = torch.Generator().manual_seed(0)
    kv_len, groups, scaling = 45, 2, 0.25
    query = torch.randn(2, 4, q_len, HEAD_DIM, generator=gen)
    key, value = (torch.randn(2, 2, kv_len, HEAD_DIM, generator=gen) for _ in range(2))
    mask = additive_mask(2, q_len, kv_len, padded=5) if masked else None
    expected, _ = attention._corrected(query, key, value, mask, scaling, groups, spec, 0,
                                       *full_counts(spec, q_len, kv_len, prompt_len))
    monkeypatch.setattr(attention, "BLOCK", 7)
    got, _ = attention.attend(query, key, value, mask, scaling, groups, spec, 0, prompt_len)
    seen = torch.ones(2, q_len, dtype=torch.bool)  # queries that see some key (not padding)
    if masked:
        seen = (mask > torch.finfo(mask.dtype).min).any(-1)[:, 0]
    assert torch.allclose(got[seen], expected[seen], rtol=0, atol=1e-6)
    plain, _ = attention._eager(query, key, value, mask, scaling, groups)
    assert (got[seen] - plain[seen]).abs().amax() > 1e-3  # the pruning is really applied


def full_counts(spec: KVSparsity, q_len: int, kv_len: int, prompt_len: int):
    """Per query, how many of the oldest keys (values) it sees pruned; None for a side not pruned."""
    positions = torch.arange(kv_len - q_len, kv_len)
    live = positions >= (prompt_len if spec.prefill == "dense" else 0)
    return (spec.keys_pruned_before(positions) * live if spec.prunes_keys(0) else None,
            spec.values_pruned_before(positions) * live if spec.prunes_values(0) else None)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_generate_with_the_cache_matches_teacher_forcing_on_its_output(family):
    model, ids, spec = tiny_model(family), prompt(length=14), KVSparsity(0.7, 0.7, window=8)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                         past_key_values=MustafarCache(model.config, spec), output_logits=True,
                         return_dict_in_generate=True)
    forced = teacher_forced(model, out.sequences[:, :-1], spec, prompt_len=ids.shape[1])
    generated = torch.stack(out.logits, dim=1)
    assert torch.allclose(forced[:, ids.shape[1] - 1:], generated, rtol=0, atol=2e-5)


def test_teacher_forced_default_scores_every_token_as_decoded_one_by_one():
    model, ids, spec = tiny_model("llama"), prompt(length=30), KVSparsity(0.7, 0.7, window=8)
    decoded, _ = decode_step_by_step(model, ids, prefill=1, spec=spec)
    assert torch.allclose(teacher_forced(model, ids, spec), decoded, rtol=0, atol=2e-5)


def run_calls(model, ids: torch.Tensor, calls, cache: Cache, spec: KVSparsity | None = None,
              prompt_len: int = 0) -> torch.Tensor:
    """Logits of ``ids`` fed to ``cache`` in the slices ``calls``, inside the Mustafar attention if
    ``spec``."""
    scope = mustafar_attention(model, spec, prompt_len) if spec is not None else nullcontext()
    with torch.no_grad(), scope:
        return torch.cat([model(ids[:, a:b], past_key_values=cache, use_cache=True).logits
                          for a, b in calls], dim=1)


# a prompt, chunks, tokens
CALLS = ((0, 20), (20, 27), (27, 28), (28, 40), *((t, t + 1) for t in range(40, 48)))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pruned_prefill_gives_the_teacher_forced_logits_however_the_calls_split(family):
    model, ids = tiny_model(family), prompt(length=48)
    spec = KVSparsity(0.7, 0.5, window=8, prefill="pruned")
    cached = run_calls(model, ids, CALLS, MustafarCache(model.config, spec), spec)
    forced = teacher_forced(model, ids, spec, prompt_len=20)  # the prompt's queries see pruned keys too
    assert torch.allclose(cached, forced, rtol=0, atol=2e-5)
    assert torch.equal(forced, teacher_forced(model, ids, replace(spec, prefill="dense")))  # = prompt_len 0
    with pytest.raises(RuntimeError, match="mustafar_attention"), torch.no_grad():
        model(ids[:, :4], past_key_values=MustafarCache(model.config, spec), use_cache=True)


def test_dense_prefill_cache_alone_leaves_a_later_chunk_less_pruned_and_the_attention_makes_it_exact():
    """Pins the cache's behaviour alone: one pruning per call, so a multi-token call after the prompt (chunked
    prefill, drafted tokens) attends to more dense tokens than one-by-one decoding would."""
    model, ids, spec = tiny_model("llama"), prompt(length=48), KVSparsity(0.7, 0.7, window=8)
    forced = teacher_forced(model, ids, spec, prompt_len=20)
    under = run_calls(model, ids, CALLS, MustafarCache(model.config, spec), spec, prompt_len=20)
    assert torch.allclose(under, forced, rtol=0, atol=2e-5)
    alone = run_calls(model, ids, CALLS, MustafarCache(model.config, spec))
    assert torch.allclose(alone[:, :21], forced[:, :21], rtol=0, atol=2e-5)  # the prompt and the first query
    # queries 21..26 saw keys 12.. still dense
    assert (alone[:, 21:27] - forced[:, 21:27]).abs().amax() > 1e-3


def test_model_loaded_with_the_implementation_name_needs_the_context_manager():
    model = tiny_model("llama")
    with mustafar_attention(model, KVSparsity()):
        pass
    broken = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="mustafar")
    with pytest.raises(RuntimeError, match="mustafar_attention"), torch.no_grad():
        broken(prompt(length=4))


# ---------------------------------------------------------------- the compressed storage

class ZeroFilledLayer(DynamicLayer):
    """The reference: the cache before compression, pruning in place into zero-filled dense tensors."""

    def __init__(self, spec: KVSparsity):
        super().__init__()
        self.spec, self.k_pruned, self.v_pruned = spec, 0, 0

    def update(self, key_states, value_states, *args, **kwargs):
        position = self.get_seq_length()
        if position:
            self.k_pruned = self._prune(self.keys, self.k_pruned, self.spec.keys_pruned_before(position),
                                        self.spec.keys)
            self.v_pruned = self._prune(self.values, self.v_pruned, self.spec.values_pruned_before(position),
                                        self.spec.values)
        return super().update(key_states, value_states)

    @staticmethod
    def _prune(states, start, stop, criterion):
        if stop > start:
            states[..., start:stop, :] = criterion(states[..., start:stop, :])
        return max(start, stop)

    def crop(self, tokens_to_remove):
        super().crop(tokens_to_remove)
        length = self.get_seq_length()
        self.k_pruned, self.v_pruned = min(self.k_pruned, length), min(self.v_pruned, length)


def zero_filled_cache(model, spec: KVSparsity) -> Cache:
    return Cache(layers=[ZeroFilledLayer(spec) for _ in range(model.config.num_hidden_layers)])


LONG = SimpleNamespace(prefill=20, length=320, spec=KVSparsity(0.7, 0.5, window=8))
LONG_PRUNED = LONG.length - 1 - LONG.spec.window  # after the last step: 311 pruned, 9 dense


def decode_both(model, ids: torch.Tensor, prefill: int, spec: KVSparsity, **options):
    """((logits, zero-filled reference cache), (logits, MustafarCache(**options))) after the same decoding."""
    return (decode_step_by_step(model, ids, prefill, spec, cache=zero_filled_cache(model, spec)),
            decode_step_by_step(model, ids, prefill, spec, **options))


@pytest.fixture(scope="module")
def long_reference():
    """Prefill 20 + decode 300 on a tiny llama (batch 2: 4 streams per layer) with the zero-filled cache."""
    model, ids = tiny_model("llama"), prompt(length=LONG.length, seed=3)
    logits, cache = decode_step_by_step(model, ids, LONG.prefill, LONG.spec,
                                        cache=zero_filled_cache(model, LONG.spec))
    return SimpleNamespace(model=model, ids=ids, logits=logits, cache=cache)


@pytest.fixture(scope="module", params=[64, 256], ids=["chunk64", "chunk256"])
def long_decode(request, long_reference):
    ref = long_reference
    logits, cache = decode_step_by_step(ref.model, ref.ids, LONG.prefill, LONG.spec, chunk=request.param)
    return SimpleNamespace(chunk=request.param, logits=logits, cache=cache)


def _buffers(layer: MustafarLayer) -> list[torch.Tensor]:
    return [t for s in (layer.k, layer.v) for c in s.chunks
            for t in (c.bitmaps, c.accum, c.offsets, c.values)] + \
        [t for s in (layer.k, layer.v) for t in (s.staging, s.window)]


def test_long_decode_holds_its_buffers_bytes_and_saves_what_the_format_predicts(long_decode, long_reference):
    chunk, stats, value_bytes = long_decode.chunk, long_decode.cache.stats(), 4
    chunks, staged = divmod(LONG_PRUNED, chunk)
    buffers = [t for layer in long_decode.cache.layers for t in _buffers(layer)]
    # the cache holds exactly its buffers, and each owns exactly its bytes (no view into a larger one)
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in buffers)
    assert stats.held_bytes == sum(t.numel() * t.element_size() for t in buffers)
    token = 2 * 2 * HEAD_DIM * value_bytes  # one token's K (or V): batch · kv heads · head_dim · fp32
    assert stats.dense_bytes == 2 * 2 * LONG.length * token  # layers · K and V · tokens
    assert stats.k_compressed_tokens == stats.v_compressed_tokens == 2 * chunks * chunk
    assert stats.staging_bytes == 2 * 2 * staged * token and stats.window_bytes == 2 * 2 * 9 * token

    # the saving predicted by the format's formula from the reference's pruned tensors, chunk by chunk
    saved = {"k": 0, "v": 0}
    predicted = {"k": 0, "v": 0}
    for layer in long_reference.cache.layers:
        for kv, states in (("k", layer.keys), ("v", layer.values)):
            for i in range(chunks):
                nonzero = states[..., i * chunk:(i + 1) * chunk, :] != 0
                tile_nnz = (nonzero.reshape(4, chunk // 64, 64, HEAD_DIM).sum(2)  # 64 tokens of a channel
                            if kv == "k"
                            else nonzero.reshape(4, chunk, HEAD_DIM).sum(-1))  # one token's 16 channels
                predicted[kv] += stream_nbytes(tile_nnz.reshape(4, -1), value_bytes)
                saved[kv] += chunk * token - stream_nbytes(tile_nnz.reshape(4, -1), value_bytes)
    assert stats.k_compressed_bytes == predicted["k"] and stats.v_compressed_bytes == predicted["v"]
    assert stats.dense_bytes - stats.held_bytes == saved["k"] + saved["v"] > 0
    # V at 50 % of 16 channels: 8 nonzeros per token-tile, so per chunk and stream exactly
    # chunk · (8 B bitmap + 4 B prefix sum + 8 values · 4 B) + 4 B last prefix sum + 4 B offset
    assert stats.v_compressed_bytes == 2 * chunks * 4 * (chunk * (8 + 4 + 8 * value_bytes) + 8)
    print(f"\nchunk {chunk}: dense {stats.dense_bytes} B, held {stats.held_bytes} B "
          f"({stats.held_bytes / stats.dense_bytes:.3f}); K chunks {stats.k_compressed_bytes} B, "
          f"V chunks {stats.v_compressed_bytes} B, staging {stats.staging_bytes} B, "
          f"window {stats.window_bytes} B")


def test_a_chunk_completed_by_the_last_step_leaves_no_dense_copy_behind():
    model, ids, spec = tiny_model("llama"), prompt(length=73), KVSparsity(0.7, 0.5, window=8)
    _, cache = decode_step_by_step(model, ids, 20, spec, chunk=64)  # the last step prunes token 63: one chunk
    stats, buffers = cache.stats(), [t for layer in cache.layers for t in _buffers(layer)]
    assert stats.k_compressed_tokens == 2 * 64 and stats.staging_bytes == 0
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in buffers)
    assert stats.held_bytes == stats.k_compressed_bytes + stats.v_compressed_bytes + stats.window_bytes


def test_decoding_over_compressed_chunks_is_bit_identical_to_the_zero_filled_cache(
        long_decode, long_reference):
    assert len(long_decode.cache.layers[0].k.chunks) == LONG_PRUNED // long_decode.chunk > 0
    assert torch.equal(long_decode.logits, long_reference.logits)
    forced = teacher_forced(long_reference.model, long_reference.ids, LONG.spec, prompt_len=LONG.prefill)
    assert torch.allclose(forced, long_decode.logits, rtol=0, atol=2e-5)


def test_held_keys_and_values_decompress_to_the_pruned_dense_tensors(long_decode, long_reference):
    chunk = long_decode.chunk
    for layer, ref in zip(long_decode.cache.layers, long_reference.cache.layers):
        for stream, pruned in ((layer.k, ref.keys), (layer.v, ref.values)):
            assert len(stream.chunks) == LONG_PRUNED // chunk
            for i, c in enumerate(stream.chunks):
                assert c.shape[-2] == chunk and c.layout == stream.layout
                assert torch.equal(decompress(c), pruned[..., i * chunk:(i + 1) * chunk, :])
            start = len(stream.chunks) * chunk
            assert torch.equal(stream.staging, pruned[..., start:LONG_PRUNED, :])
            assert torch.equal(stream.window, pruned[..., LONG_PRUNED:, :])
        keys, values = layer.dense()
        assert torch.equal(keys, ref.keys) and torch.equal(values, ref.values)


@pytest.mark.parametrize("spec", [KVSparsity(0.7, 0.7, window=8, reference=True),
                                  KVSparsity(0.5, 0.7, window=8, v_method="per_channel", group=4)],
                         ids=["reference", "per_channel_v"])
def test_other_criteria_over_compressed_chunks_match_the_zero_filled_cache(spec):
    model, ids = tiny_model("qwen2"), prompt(length=160, seed=4)
    (expected, ref), (logits, cache) = decode_both(model, ids, 20, spec, chunk=64)
    assert len(cache.layers[0].k.chunks) == 2
    assert torch.equal(logits, expected)
    assert all(torch.equal(a, b) for layer, r in zip(cache.layers, ref.layers)
               for a, b in zip(layer.dense(), (r.keys, r.values)))


def test_keep_decompressed_gives_the_same_logits_and_counts_its_copy(long_reference):
    ref = long_reference
    logits, cache = decode_step_by_step(ref.model, ref.ids, LONG.prefill, LONG.spec, chunk=64,
                                        keep_decompressed=True)
    assert torch.equal(logits, ref.logits)
    stats = cache.stats()
    memo = 2 * 2 * (LONG_PRUNED // 64 * 64) * (2 * 2 * HEAD_DIM * 4)  # layers · K, V · chunked tokens · token
    assert stats.decompressed_bytes == memo
    # nothing saved, as documented
    assert stats.held_bytes == (stats.k_compressed_bytes + stats.v_compressed_bytes + stats.staging_bytes
                                + stats.window_bytes + memo) > stats.dense_bytes


def test_beam_search_reorders_compressed_chunks_like_the_zero_filled_cache():
    """End to end through generate; beams mostly share their old tokens, so the direct test is the one
    that catches chunks left unreordered (below)."""
    # 40 + 40 tokens, window 4: a chunk (tokens 0..63, 24 of them generated) forms and is reordered
    model, ids, spec = tiny_model("llama"), prompt(length=40, seed=5), KVSparsity(0.7, 0.7, window=4)
    runs = [model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, num_beams=3,
                           do_sample=False, past_key_values=cache, output_scores=True,
                           return_dict_in_generate=True)
            for cache in (zero_filled_cache(model, spec), MustafarCache(model.config, spec, chunk=64))]
    assert runs[1].sequences.shape[1] == 80 and torch.equal(runs[0].sequences, runs[1].sequences)
    assert torch.equal(runs[0].sequences_scores, runs[1].sequences_scores)


@pytest.mark.parametrize("keep", [False, True], ids=["on_read", "kept"])
def test_batch_reorder_select_and_repeat_move_compressed_chunks_with_their_rows(keep):
    model, ids, spec = tiny_model("llama"), prompt(length=110, seed=7), KVSparsity(0.7, 0.7, window=8)
    (_, ref), (_, cache) = decode_both(model, ids[:, :100], 20, spec, chunk=64, keep_decompressed=keep)
    assert len(cache.layers[0].k.chunks) == 1  # 91 pruned: one chunk and 27 staged
    for op, arg in (("reorder_cache", torch.tensor([1, 0])), ("batch_select_indices", torch.tensor([0])),
                    ("batch_repeat_interleave", 2)):  # ends with row 1, twice
        for c in (ref, cache):
            getattr(c, op)(arg)
        assert all(torch.equal(a, b) for layer, r in zip(cache.layers, ref.layers)
                   for a, b in zip(layer.dense(), (r.keys, r.values)))
    rows = ids[[1, 1]]
    with torch.no_grad():
        expected, logits = [[model(rows[:, t:t + 1], past_key_values=c, use_cache=True).logits
                             for t in range(100, 110)]
                            for c in (ref, cache)]
    assert all(torch.equal(a, b) for a, b in zip(logits, expected))


@pytest.mark.parametrize("keep", [False, True], ids=["on_read", "kept"])
def test_crop_into_a_chunk_keeps_tokens_pruned_and_decoding_matches(keep):
    model, ids, spec = tiny_model("llama"), prompt(length=190, seed=6), KVSparsity(0.7, 0.7, window=8)
    (_, ref), (_, cache) = decode_both(model, ids[:, :150], 20, spec, chunk=64, keep_decompressed=keep)
    assert len(cache.layers[0].k.chunks) == 2  # 141 pruned
    for c in (ref, cache):
        c.crop(-3)  # inside the window
        c.crop(-97)  # 50 left: both chunks go back to staging, still pruned
    assert cache.get_seq_length() == 50 and cache.layers[0].k_pruned == 50 and not cache.layers[0].k.chunks
    assert all(torch.equal(a, b) for layer, r in zip(cache.layers, ref.layers)
               for a, b in zip(layer.dense(), (r.keys, r.values)))
    with torch.no_grad():  # decode on from the 50 kept tokens: 189 − 8 = 181 pruned, two chunks again
        expected, logits = [[model(ids[:, t:t + 1], past_key_values=c, use_cache=True).logits
                             for t in range(50, 190)]
                            for c in (ref, cache)]
    assert all(torch.equal(a, b) for a, b in zip(logits, expected)) and len(cache.layers[0].k.chunks) == 2


def test_chunk_must_hold_whole_key_tiles():
    with pytest.raises(ValueError, match="multiple of 64"):
        MustafarCache(tiny_config("llama"), KVSparsity(), chunk=100)
