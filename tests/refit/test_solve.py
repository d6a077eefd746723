"""Least-squares reconstruction math (megatron.prune.refit.solve): tiny tensors, CPU, exact checks."""

from __future__ import annotations

import pytest
import torch

from megatron.prune.refit import solve as rc


def _data(seed: int, tokens: int = 256, n: int = 12, out: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    W = torch.randn(out, n, generator=g, dtype=torch.float64)
    return x, W


def _moment(a, b=None):
    m = rc.Moment()
    m.add(a, b)
    return m.mean()


def reader_formula(W, kept, H, delta):
    """The textbook refit, written out independently of the solver: ``W_K + W_P H_PK (H_KK + λI)⁻¹``,
    λ = δ·mean(diag H_KK)."""
    K = torch.as_tensor(kept)
    P = torch.as_tensor([i for i in range(W.shape[1]) if i not in set(kept)], dtype=torch.long)
    H_KK = H[K][:, K]
    lam = delta * H_KK.diagonal().mean()
    A = H_KK + lam * torch.eye(len(K), dtype=H.dtype)
    return W[:, K] + torch.linalg.solve(A, H[K][:, P] @ W[:, P].T).T


def refit(W, kept, H, delta):
    """The solver as the layers use it, for ``x_s = x_t[K]``: ``E[y x_sᵀ] = W H[:, K]``, prior ``W_K``."""
    return rc.solve_from_moments(W @ H[:, kept], H[kept][:, kept], W[:, kept], delta)


def test_dependent_channel_removed_exactly():
    """A dropped channel that is a linear combination of kept ones: the refit reproduces W x exactly; slicing does
    not."""
    x, W = _data(0)
    x[:, 3] = 0.5 * x[:, 0] - 2.0 * x[:, 7] + x[:, 9]
    kept = [i for i in range(x.shape[1]) if i != 3]
    W2 = refit(W, kept, _moment(x), delta=0.0)
    assert W2.shape == (W.shape[0], len(kept))
    torch.testing.assert_close(x[:, kept] @ W2.T, x @ W.T, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(x[:, kept] @ W[:, kept].T, x @ W.T, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nothing_pruned_gives_the_weights_back(dtype):
    """Every input kept: the solve returns W (to rounding; a keep-all plan skips the refit, so the written model is
    the input bit for bit)."""
    x, W = _data(2)
    H = _moment(x)
    out = rc.solve_from_moments(W @ H, H, W.to(dtype), delta=0.01)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), W, rtol=1e-5 if dtype == torch.float32 else 1e-9, atol=1e-6)


@pytest.mark.parametrize("delta", [1e-3, 0.01, 0.1])
def test_two_stream_reduces_to_reader_formula_with_damping(delta):
    """Ridge toward the sliced weights: (W C + λ W_K)(H_KK + λ)⁻¹ = W_K + W_P H_PK (H_KK + λ)⁻¹, for any δ."""
    x, W = _data(3)
    kept = [0, 2, 3, 5, 8, 9, 11]
    H = _moment(x)
    a = reader_formula(W, kept, H, delta)
    b = refit(W, kept, H, delta)
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("seed", range(8))
def test_refit_error_is_minimal(seed):
    """Property: on calibration data the refit's error is <= slicing's and <= any random perturbation of it."""
    g = torch.Generator().manual_seed(100 + seed)
    x, W = _data(seed, tokens=64 + 16 * seed, n=10, out=4)
    kept = sorted(torch.randperm(10, generator=g)[: 4 + seed % 5].tolist())
    H = _moment(x)
    y = x @ W.T

    def err(Wk):
        return float((x[:, kept] @ Wk.T - y).pow(2).sum(1).mean())

    W2 = refit(W, kept, H, delta=0.0)
    e = err(W2)
    assert e <= err(W[:, kept]) + 1e-9
    for _ in range(20):
        assert e <= err(W2 + 1e-3 * torch.randn(W2.shape, generator=g, dtype=W2.dtype)) + 1e-12
    # the same minimum read from moments
    xs = x[:, kept]
    assert rc.reconstruction_error(W2, _moment(xs), _moment(y, xs), _moment(y)) == pytest.approx(e, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_two_stream_error_is_minimal(seed):
    """Two streams (student input is a noisy, smaller copy of the teacher's): the solve minimises the ridge
    objective."""
    g = torch.Generator().manual_seed(seed)
    xt, W = _data(10 + seed, n=9)
    xs = xt[:, :6] + 0.3 * torch.randn(xt.shape[0], 6, generator=g, dtype=torch.float64)
    prior = W[:, :6].clone()
    delta = 0.01
    H, C = _moment(xs), _moment(xt, xs)
    W2 = rc.solve_from_moments(W @ C, H, prior, delta)
    lam = delta * H.diagonal().mean()

    def obj(Wk):
        return float((xs @ Wk.T - xt @ W.T).pow(2).sum(1).mean() + lam * (Wk - prior).pow(2).sum())

    assert obj(W2) <= obj(prior)
    for _ in range(20):
        assert obj(W2) <= obj(W2 + 1e-3 * torch.randn(W2.shape, generator=g, dtype=W2.dtype)) + 1e-12


def test_singular_beyond_damping_raises():
    W = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(rc.SingularMomentError, match="is zero: its input is 0 on every calibration token") as e:
        refit(W, [0, 1], torch.zeros(4, 4, dtype=torch.float64), rc.DEFAULT_DAMPING)  # no signal at all
    assert e.value.zero
    with pytest.raises(rc.SingularMomentError, match="singular") as e:  # a zero diagonal entry beside others
        rc.damped_cholesky(torch.tensor([[1.0, 2.0], [2.0, 0.0]], dtype=torch.float64), 0.01)
    assert not e.value.zero
    with pytest.raises(rc.SingularMomentError, match="singular"):
        rc.solve_from_moments(torch.zeros(3, 2), -torch.eye(2, dtype=torch.float64), torch.zeros(3, 2))  # not PSD
    with pytest.raises(rc.SingularMomentError, match="non-finite"):
        rc.damped_cholesky(torch.full((2, 2), float("nan"), dtype=torch.float64))
    with pytest.raises(rc.SingularMomentError, match="no calibration tokens"):
        rc.Moment().mean()


def test_rank_deficient_moment_falls_back_to_more_damping():
    """Duplicate channels (an exactly singular moment): δ=0 cannot factorise, the fallback raises δ and says which."""
    H = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    assert int(torch.linalg.cholesky_ex(H).info) != 0
    L, d = rc.damped_cholesky(H, 0.0)
    assert d > 0 and torch.isfinite(L).all()
    torch.testing.assert_close(L @ L.T, rc.damp(H, d))


def test_moment_accumulates_over_batches():
    """Batched accumulation equals the one-shot float64 moment; float32 products agree to ~1e-6."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(3, 40, 7, generator=g), torch.randn(3, 40, 4, generator=g)
    exact = a.reshape(-1, 7).double().T @ b.reshape(-1, 4).double() / 120
    m64, m32 = rc.Moment(), rc.Moment(torch.float32)
    for i in range(3):
        m64.add(a[i], b[i])
        m32.add(a[i], b[i])
    assert m64.count == 120 and m64.mean().dtype == torch.float64
    torch.testing.assert_close(m64.mean(), exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m32.mean(), exact, rtol=1e-5, atol=1e-5)


def test_diagonal_gain_fit_matches_brute_force():
    """The tied-head gain refit equals a brute-force least squares over stacked logits."""
    g = torch.Generator().manual_seed(7)
    E = torch.randn(30, 8, generator=g, dtype=torch.float64)  # [vocab, h]
    kept = [0, 1, 3, 4, 6, 7]
    xt = torch.randn(40, 8, generator=g, dtype=torch.float64)
    r = xt[:, kept] + 0.1 * torch.randn(40, 6, generator=g, dtype=torch.float64)
    Q, b = rc.logit_gain_moments(rc.gram(E), torch.tensor(kept), _moment(r), _moment(xt, r))
    gain = rc.fit_diagonal(Q, b, torch.ones(6, dtype=torch.float64), delta=0.0)
    # logits_s[t, v] = Σ_i E[v, K_i] g_i r[t, i]: linear in g with design A[(t, v), i] = E[v, K_i] r[t, i]
    A = (E[:, kept][None, :, :] * r[:, None, :]).reshape(-1, 6)
    y = (xt @ E.T).reshape(-1)
    torch.testing.assert_close(gain, torch.linalg.lstsq(A, y[:, None]).solution[:, 0], rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("n", [5, 128, 300, 1030])
def test_gram_is_the_full_product(n):
    """The lower-triangle product, mirrored, is aᵀa (blocks of 128 and 256, with a ragged last block)."""
    a = torch.randn(64, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    got = rc.gram(a)
    torch.testing.assert_close(got, a.T @ a, rtol=1e-12, atol=1e-12)
    assert torch.equal(got, got.T)


@pytest.mark.parametrize("product", [torch.float64, torch.float32])
def test_symmetric_moment_over_batches_is_the_full_product(product):
    """``E[a aᵀ]`` accumulated batch by batch into the lower triangle of the float64 sum (several column blocks) and
    mirrored once: the one-shot product, exactly symmetric, and the same however often it is read."""
    g = torch.Generator().manual_seed(11)
    a = torch.randn(3, 50, 300, generator=g)
    exact = a.reshape(-1, 300).double().T @ a.reshape(-1, 300).double() / 150
    m = rc.Moment(product)
    for i in range(3):
        m.add(a[i])
    got = m.mean()
    tol = 1e-12 if product == torch.float64 else 1e-5
    torch.testing.assert_close(got, exact, rtol=tol, atol=tol)
    assert torch.equal(got, got.T) and torch.equal(m.mean(), got)
    assert torch.equal(m.pop_mean(), got) and m.sum is None  # the same, in place of the sum


def test_ridge_solves_and_scores_row_blocks_as_the_whole():
    """One factorisation, rows solved in ragged blocks: the whole solve row for row, and the blocks' error terms plus
    E‖y‖² add up to the whole weight's reconstruction error."""
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(200, 9, generator=g, dtype=torch.float64)
    W = torch.randn(23, 9, generator=g, dtype=torch.float64)
    y = xs @ W.T + 0.1 * torch.randn(200, 23, generator=g, dtype=torch.float64)
    H, C, yy = _moment(xs), _moment(y, xs), _moment(y)
    prior = W + 0.5
    whole = rc.solve_from_moments(C, H, prior, 0.05)
    ridge = rc.Ridge.factor(H, 0.05)
    blocks = [ridge.solve(C[r:r + 5], prior[r:r + 5]) for r in range(0, 23, 5)]
    torch.testing.assert_close(torch.cat(blocks), whole, rtol=1e-12, atol=1e-12)
    parts = [ridge.errors([prior[r:r + 5], whole[r:r + 5]], C[r:r + 5]) for r in range(0, 23, 5)]
    summed = [sum(p[i] for p in parts) + float(yy.trace()) for i in (0, 1)]
    assert summed == pytest.approx(rc.reconstruction_errors([prior, whole], H, C, yy), rel=1e-6)
    assert summed[1] < summed[0]
    for r in range(0, 23, 5):  # the solution's error term without its product with H: the same, to float32 rounding
        block, terms = ridge.solve_scored(C[r:r + 5], prior[r:r + 5])
        assert torch.equal(block, blocks[r // 5])
        assert terms == pytest.approx(ridge.errors([prior[r:r + 5], block], C[r:r + 5]), rel=1e-6)


def test_a_relative_error_is_never_negative():
    """An error term that rounds just below -E‖y‖² (nothing left to fit) reports 0, not -0.0000."""
    from megatron.prune.refit.solve import GroupReport

    report = GroupReport.relative([-1.0 - 1e-12, -0.5], 1.0)
    assert (report.sliced, report.refit) == (0.0, 0.5) and f"{report.sliced:.4f}" == "0.0000"
