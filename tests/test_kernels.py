"""Pruning kernels against hand-computed oracles on small matrices."""

from __future__ import annotations

import pytest
import torch

from mosaic.prune import magnitude, sparsegpt, wanda
from mosaic.prune.masks import n_of_m, row_counts, smallest_k, smallest_per_row, target_count
from mosaic.stats import InputStats


def stats_of(x: torch.Tensor, hessian: bool) -> InputStats:
    s = InputStats(x.shape[-1], x.device, hessian)
    s.add(x)
    return s


def test_wanda_mask_equals_hand_computed_oracle():
    W = torch.tensor([[1.0, -2.0, 3.0, -4.0],
                      [4.0, 3.0, -2.0, 1.0],
                      [0.5, 0.5, -8.0, 2.0]])
    # inputs whose per-feature RMS norms are 4, 1, 0.25, 2
    x = torch.tensor([[4.0, 1.0, 0.25, 2.0], [-4.0, -1.0, -0.25, -2.0]])
    stats = stats_of(x, hessian=False)
    assert torch.allclose(stats.norms(), torch.tensor([4.0, 1.0, 0.25, 2.0]))
    # scores |W|·‖X‖: row0 [4, 2, .75, 8]; row1 [16, 3, .5, 2]; row2 [2, .5, 2, 4]
    w = W.clone()
    wanda.prune([w], stats, [0.5])
    expected_zero = torch.tensor([[False, True, True, False],   # .75 and 2
                                  [False, False, True, True],   # .5 and 2
                                  [True, True, False, False]])  # .5 and the first of the tied 2s
    assert torch.equal(w == 0, expected_zero)
    assert torch.equal(w[~expected_zero], W[~expected_zero])  # survivors untouched


def test_magnitude_compares_the_whole_matrix():
    W = torch.tensor([[0.1, 0.2, 5.0, 6.0], [7.0, 8.0, 0.3, 0.4]])
    w = W.clone()
    magnitude.prune([w], None, [0.25])  # 2 of 8: the two smallest of the matrix, both in row 0
    assert torch.equal(w == 0, torch.tensor([[True, True, False, False], [False] * 4]))


def test_exact_counts_even_with_ties_and_remainders():
    ties = torch.ones(7, 13)
    for s in (0.0, 0.1, 0.3, 0.5, 0.7, 0.95):
        k = target_count(ties.numel(), s)
        assert int(smallest_k(ties, k).sum()) == k
        assert int(smallest_per_row(ties, row_counts(ties, k)).sum()) == k
    # the remainder goes to the rows with the smallest next candidate
    scores = torch.tensor([[1.0, 9.0], [1.0, 2.0], [1.0, 5.0]])
    counts = row_counts(scores, 4)  # base 1 each, one extra -> row 1 (next score 2)
    assert counts.tolist() == [1, 2, 1]


def test_n_of_m_pattern_oracle():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 9.0, 8.0, 7.0]])
    assert n_of_m(scores, 2, 4).tolist() == [[False, True, False, True, True, False, False, True]]
    with pytest.raises(ValueError):
        n_of_m(torch.ones(2, 6), 2, 4)


@pytest.mark.parametrize("kernel", [magnitude, wanda, sparsegpt])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_every_kernel_makes_an_exact_n_m_pattern(kernel, nm):
    torch.manual_seed(0)
    W = torch.randn(24, 64)
    x = torch.randn(256, 64)
    w = W.clone()
    kernel.prune([w], stats_of(x, kernel is sparsegpt), [nm[0] / nm[1]], nm)
    groups = (w == 0).view(24, -1, nm[1]).sum(-1)
    assert bool((groups == nm[0]).all())


def test_sparsegpt_at_zero_sparsity_leaves_weights_unchanged():
    torch.manual_seed(0)
    W = torch.randn(32, 200)  # 200 columns: a partial last block
    x = torch.randn(512, 200)
    w = W.clone()
    sparsegpt.prune([w], stats_of(x, True), [0.0])
    assert torch.equal(w, W)


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scale = torch.logspace(-1, 1, d)[torch.randperm(d, generator=g)]  # features of very different size
    return (torch.randn(n, d, generator=g) @ mix) * scale


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude(sparsity):
    torch.manual_seed(1)
    W = torch.randn(64, 128)
    x = correlated_inputs(2048, 128)
    ref = x @ W.t()
    errors = {}
    for name, kernel in (("magnitude", magnitude), ("wanda", wanda), ("sparsegpt", sparsegpt)):
        w = W.clone()
        kernel.prune([w], stats_of(x, name == "sparsegpt"), [sparsity])
        assert int((w == 0).sum()) == target_count(w.numel(), sparsity)
        errors[name] = (x @ w.t() - ref).norm().item()
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_sparsegpt_group_solve_equals_separate_solves():
    """q/k/v share one Hessian: solving their stacked rows equals solving each alone."""
    torch.manual_seed(2)
    x = correlated_inputs(1024, 96, seed=3)
    weights = [torch.randn(48, 96), torch.randn(16, 96), torch.randn(16, 96)]
    sparsities = [0.6, 0.4, 0.5]
    stacked = [w.clone() for w in weights]
    sparsegpt.prune(stacked, stats_of(x, True), sparsities, blocksize=32)
    for w, s, got in zip(weights, sparsities, stacked):
        alone = w.clone()
        sparsegpt.prune([alone], stats_of(x, True), [s], blocksize=32)
        assert torch.equal(alone == 0, got == 0)
        assert torch.allclose(alone, got, atol=1e-5)
        assert int((got == 0).sum()) == target_count(got.numel(), s)


def test_sparsegpt_retries_with_more_damping_when_cholesky_fails():
    H = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # indefinite: plain damping cannot factor it
    upper, damp = sparsegpt.inverse_cholesky(H, 0.01)
    assert damp > 0.01 and torch.isfinite(upper).all()


def test_hessian_from_blocked_upper_gram_is_the_full_gram():
    torch.manual_seed(3)
    x = torch.randn(300, 500)
    s = stats_of(x, True)
    assert torch.allclose(s.hessian(), x.t() @ x / 300, atol=1e-4)
    assert torch.allclose(s.mean_square(), x.square().mean(0), atol=1e-5)


def obs_reference(W: torch.Tensor, U: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
                  blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unblocked OBS: each pruned column's error updates every later column at once (no lazy batches).
    Masks are chosen as SparseGPT does: per block of columns (N:M: per M columns) from the current weights."""
    W = W.clone()
    rows, cols = W.shape
    d = U.diagonal()
    mask = torch.zeros_like(W, dtype=torch.bool)
    for j in range(cols):
        if nm is None and j % blocksize == 0:
            j2 = min(j + blocksize, cols)
            score = W[:, j:j2].square() / d[j:j2].square()
            mask[:, j:j2] = smallest_k(score, sparsegpt._block_budget(rows, sparsity, j, j2))
        if nm is not None and j % nm[1] == 0:
            j2 = j + nm[1]
            mask[:, j:j2] = n_of_m(W[:, j:j2].square() / d[j:j2].square(), *nm)
        err = W[:, j] * mask[:, j] / d[j]
        W[:, j:] -= torch.outer(err, U[j, j:])
    return W.masked_fill(mask, 0), mask


@pytest.mark.parametrize("sparsity, nm", [(0.6, None), (0.5, (2, 4))])
def test_sparsegpt_lazy_blocks_equal_unblocked_obs(sparsity, nm):
    """3.5 blocks of 32 columns: later blocks depend on the lazy update from the earlier ones."""
    torch.manual_seed(4)
    W = torch.randn(40, 112)
    stats = stats_of(correlated_inputs(1024, 112, seed=5), True)
    U, _ = sparsegpt.inverse_cholesky(stats.hessian(), 0.01)
    expected, expected_mask = obs_reference(W, U, sparsity, nm, blocksize=32)
    got = W.clone()
    sparsegpt.prune([got], stats, [sparsity], nm, blocksize=32)
    assert torch.equal(got == 0, expected_mask)
    assert torch.allclose(got, expected, atol=1e-4 * float(W.abs().max()), rtol=0)


def test_sparsegpt_factor_kept_with_the_statistics_gives_identical_results():
    """The search prunes one group at many sparsities from one set of statistics: the second and later calls
    reuse the factor of H⁻¹, and give what fresh statistics give, bit for bit; new data clears it."""
    torch.manual_seed(6)
    W = torch.randn(24, 64)
    x = correlated_inputs(512, 64, seed=7)
    shared = stats_of(x, True)
    for sparsity in (0.3, 0.7, 0.5):
        got, fresh = W.clone(), W.clone()
        sparsegpt.prune([got], shared, [sparsity])
        sparsegpt.prune([fresh], stats_of(x, True), [sparsity])
        assert torch.equal(got, fresh)
    assert list(shared.derived) == [("sparsegpt", 0.01)]
    assert shared.to(torch.device("cpu")) is shared
    shared.add(correlated_inputs(512, 64, seed=8))
    assert shared.derived == {}
    got, fresh = W.clone(), W.clone()
    sparsegpt.prune([got], shared, [0.5])
    sparsegpt.prune([fresh], stats_of(torch.cat([x, correlated_inputs(512, 64, seed=8)]), True), [0.5])
    assert torch.allclose(got, fresh, atol=1e-5)
