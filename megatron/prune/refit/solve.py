"""Least-squares weight reconstruction after structured pruning: the math, as small pure torch functions.

A linear ``y = W x`` that *reads* a pruned axis loses the dropped input channels P and keeps K. With the
second moment ``H = E[x xᵀ]`` of its input on calibration tokens, the weights that best reproduce ``W x`` from
``x_K`` alone are ``W_K + W_P H_PK H_KK⁻¹`` (:func:`refit_reader`). When the pruned model's input ``x_s`` is no
longer a slice of the original input ``x_t`` (upstream layers were pruned too), the same least squares reads
``W' = W E[x_t x_sᵀ] E[x_s x_sᵀ]⁻¹`` (:func:`refit_two_stream`); it reduces to the first formula when
``x_s = x_t[K]``. Damping is a ridge toward the plainly sliced weights, so it never shrinks them toward zero.

Conventions: weights are ``[out, in]`` (torch ``Linear``); activations are ``[tokens, n]``; moments are float64.
Nothing here knows about models, checkpoints or plans.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_DAMPING = 0.01  # δ: ridge of δ·mean(diag H); measured against 0.001 and 0.1 by bench/quality.py
MAX_DAMPING = 1.0  # the damping fallback gives up beyond this δ


class SingularMomentError(ValueError):
    """A moment matrix stays singular (or is not a finite PSD matrix) even with the largest damping."""


# ---- moments ---------------------------------------------------------------------------------------------


def gram(a: torch.Tensor) -> torch.Tensor:
    """``aᵀa`` for ``a [T, n]``, computing only the lower triangle by column blocks and mirroring it: ~3/4 of the
    full product's work at n ≈ 500, ~5/8 at n ≥ 1000 (torch has no symmetric rank-k product)."""
    n = a.shape[1]
    block = 128 if n <= 768 else 256
    out = torch.empty(n, n, dtype=a.dtype, device=a.device)
    for i in range(0, n, block):
        out[i:, i:i + block] = a[:, i:].T @ a[:, i:i + block]
    low = out.tril()  # exactly symmetric, which a plain aᵀa need not be
    return low + low.tril(-1).T


class Moment:
    """Running ``E[a bᵀ]`` over token batches ``a [T, n]``, ``b [T, m]`` (``b`` omitted: ``E[a aᵀ]``), summed in float64.

    ``product`` is the dtype of each batch's matmul: float64 is exact; float32 is 2x faster on CPU and, summed
    per batch into float64, loses nothing the damping would not swamp (relative error ~1e-6 per batch).
    """

    def __init__(self, product: torch.dtype = torch.float64) -> None:
        self.sum: torch.Tensor | None = None
        self.count = 0
        self.product = product

    def add(self, a: torch.Tensor, b: torch.Tensor | None = None) -> None:
        """Accumulate one batch (leading dims are flattened into tokens)."""
        a = a.reshape(-1, a.shape[-1]).to(self.product)
        if b is None:
            part = gram(a).double()
        else:
            b = b.reshape(-1, b.shape[-1]).to(self.product)
            if a.shape[0] != b.shape[0]:
                raise ValueError(f"moment of {a.shape[0]} tokens against {b.shape[0]}")
            part = (a.T @ b).double()
        self.sum = part if self.sum is None else self.sum.add_(part)
        self.count += a.shape[0]

    def mean(self) -> torch.Tensor:
        """The moment ``E[a bᵀ]`` (float64)."""
        if self.sum is None or self.count == 0:
            raise SingularMomentError("no calibration tokens were accumulated")
        return self.sum / self.count


def damp(H: torch.Tensor, delta: float) -> torch.Tensor:
    """``H + δ·mean(diag H)·I``: the usual relative damping (SparseGPT), so δ is scale-free."""
    return H + (delta * H.diagonal().mean()) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


def damped_cholesky(H: torch.Tensor, delta: float = DEFAULT_DAMPING,
                    max_delta: float = MAX_DAMPING) -> tuple[torch.Tensor, float]:
    """Cholesky factor of ``damp(H, δ)`` and the δ used, raising δ tenfold until it factorises (up to ``max_delta``).

    Returns ``(L, δ)``; raises :class:`SingularMomentError` when H is empty, non-finite, or not PSD enough.
    """
    H = H.double()
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise SingularMomentError(f"moment must be a square matrix, got shape {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise SingularMomentError("moment matrix has non-finite entries")
    d = float(delta)
    while True:
        L, info = torch.linalg.cholesky_ex(damp(H, d))
        if int(info) == 0:
            return L, d
        if d >= max_delta:
            scale = float(H.diagonal().mean()) if H.numel() else 0.0
            raise SingularMomentError(f"moment matrix {tuple(H.shape)} is singular even with damping "
                                      f"δ={d:g} (mean diagonal {scale:.3g}): no usable calibration signal")
        d = max(d, 1e-6) * 10
        d = min(d, max_delta)


# ---- least-squares refits ----------------------------------------------------------------------------------


def _index(kept: Sequence[int] | torch.Tensor, n: int) -> torch.Tensor:
    k = torch.as_tensor(kept, dtype=torch.long).reshape(-1)
    if k.numel() and (k.min() < 0 or k.max() >= n):
        raise ValueError(f"kept index out of range [0, {n})")
    if k.unique().numel() != k.numel():
        raise ValueError("kept indices repeat")
    return k


def dropped(kept: Sequence[int] | torch.Tensor, n: int) -> torch.Tensor:
    """The complement of ``kept`` in ``range(n)``, ascending."""
    mask = torch.ones(n, dtype=torch.bool)
    mask[_index(kept, n)] = False
    return mask.nonzero().reshape(-1)


def refit_reader(W: torch.Tensor, kept: Sequence[int] | torch.Tensor, H: torch.Tensor,
                 delta: float = DEFAULT_DAMPING) -> torch.Tensor:
    """``W_K + W_P H_PK (H_KK + λI)⁻¹``: the reader's weights on kept inputs that best reproduce ``W x`` from ``x_K``.

    ``W [out, n]``, ``H = E[x xᵀ] [n, n]``; returns ``[out, |K|]`` in W's dtype. Nothing dropped: ``W[:, K]`` bit for bit.
    """
    n = W.shape[1]
    K, P = _index(kept, n), dropped(kept, n)
    H = H.double()
    HK = H.index_select(0, K)
    return refit_dropped(W.index_select(1, K), W.index_select(1, P), HK.index_select(1, K), HK.index_select(1, P).T,
                         delta)


def refit_dropped(W_K: torch.Tensor, W_P: torch.Tensor, H_KK: torch.Tensor, C_PK: torch.Tensor,
                  delta: float = DEFAULT_DAMPING) -> torch.Tensor:
    """``W_K + W_P C_PK (H_KK + λI)⁻¹``: keep the kept columns, regress the dropped inputs' contribution on the kept ones.

    ``C_PK = E[x_P x_Kᵀ]`` may come from another stream than ``H_KK = E[x_K x_Kᵀ]`` (the dropped hidden channels
    exist only in the original model); with ``C_PK = H_PK`` this is :func:`refit_reader`. No dropped columns: ``W_K``.
    """
    if W_P.shape[1] == 0:
        return W_K
    L, _ = damped_cholesky(H_KK, delta)
    corr = torch.cholesky_solve(C_PK.double().T @ W_P.double().T, L).T  # (H_KK+λ)⁻¹ C_KP W_Pᵀ, transposed
    return (W_K.double() + corr).to(W_K.dtype)


def solve_from_moments(C_ys: torch.Tensor, H_ss: torch.Tensor, prior: torch.Tensor,
                       delta: float = DEFAULT_DAMPING) -> torch.Tensor:
    """``argmin_W' E‖W' x_s − y‖² + λ‖W' − prior‖²`` = ``(C_ys + λ prior)(H_ss + λI)⁻¹``, λ = δ·mean(diag H_ss).

    ``C_ys = E[y x_sᵀ] [out, n_s]``, ``H_ss = E[x_s x_sᵀ]``, ``prior [out, n_s]`` (the plainly sliced weights);
    returns prior's dtype. The ridge pulls toward ``prior`` rather than zero.
    """
    L, d = damped_cholesky(H_ss, delta)
    lam = d * H_ss.double().diagonal().mean()
    rhs = C_ys.double() + lam * prior.double()
    return torch.cholesky_solve(rhs.T, L).T.to(prior.dtype)


def refit_two_stream(W: torch.Tensor, H_ss: torch.Tensor, C_ts: torch.Tensor, prior: torch.Tensor,
                     delta: float = DEFAULT_DAMPING) -> torch.Tensor:
    """``W' = argmin E‖W' x_s − W x_t‖²`` (ridge toward ``prior``): ``(W C_ts + λ prior)(H_ss + λI)⁻¹``.

    ``W [out, n_t]`` reads the original input ``x_t``; the pruned reader sees ``x_s [n_s]``;
    ``C_ts = E[x_t x_sᵀ] [n_t, n_s]``. With ``x_s = x_t[K]`` and ``prior = W[:, K]`` this is :func:`refit_reader`.
    """
    return solve_from_moments(W.double() @ C_ts.double(), H_ss, prior, delta)


def reconstruction_error(W: torch.Tensor, H_ss: torch.Tensor, C_ys: torch.Tensor, yy: torch.Tensor | float) -> float:
    """``E‖W x_s − y‖²`` from moments: ``tr(W H Wᵀ) − 2 tr(W C_ysᵀ) + E‖y‖²`` (``yy``: ``E‖y‖²`` or ``E[y yᵀ]``).
    The products run in float32 (a report, not a solve)."""
    W = W.float()
    y2 = float(yy.double().trace()) if torch.is_tensor(yy) and yy.dim() == 2 else float(yy)
    return float(((W @ H_ss.float()) * W).double().sum() - 2 * (W * C_ys.float()).double().sum()) + y2


# ---- depth: ReplaceMe -------------------------------------------------------------------------------------


def replaceme_fit(H_mm: torch.Tensor, C_mr: torch.Tensor, delta: float = DEFAULT_DAMPING) -> torch.Tensor:
    """``T = argmin E‖Tᵀ m − r‖² + λ‖T − I‖²`` = ``(H_mm + λI)⁻¹ (C_mr + λI)`` (ReplaceMe, least squares).

    ``m`` is the MLP output of the last kept block before a dropped run, ``r = h_after_run − y`` what the MLP and
    the dropped run added to the residual ``y``; ``H_mm = E[m mᵀ]``, ``C_mr = E[m rᵀ]``, both ``[h, h]``.
    In the row convention of ReplaceMe this minimises ``‖M T − R‖``; the ridge pulls toward the identity.
    """
    L, d = damped_cholesky(H_mm, delta)
    lam = d * H_mm.double().diagonal().mean()
    return torch.cholesky_solve(C_mr.double() + lam * torch.eye(H_mm.shape[0], dtype=torch.float64), L)


def fold_replaceme(W_down: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """``Tᵀ W_down``: the down projection whose output is ``Tᵀ m`` (i.e. ``M T`` in rows); no new parameters."""
    return (T.double().T @ W_down.double()).to(W_down.dtype)


# ---- tied embeddings: a diagonal refit of the final norm ----------------------------------------------------


def fit_diagonal(Q: torch.Tensor, b: torch.Tensor, prior: torch.Tensor, delta: float = DEFAULT_DAMPING) -> torch.Tensor:
    """``argmin_g gᵀQg − 2bᵀg + λ‖g − prior‖²`` = ``(Q + λI)⁻¹ (b + λ prior)``: a per-channel gain by least squares."""
    L, d = damped_cholesky(Q, delta)
    lam = d * Q.double().diagonal().mean()
    return torch.cholesky_solve((b.double() + lam * prior.double())[:, None], L)[:, 0].to(prior.dtype)


def logit_gain_moments(E_K: torch.Tensor, E: torch.Tensor, R_ss: torch.Tensor,
                       C_ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, b)`` of :func:`fit_diagonal` for ``min E‖E_K diag(g) r − E x_t‖²`` (tied head, gain g on kept channels).

    ``r`` is the pruned model's final hidden state normalised but not yet scaled by the norm gain ``[n_s]``,
    ``x_t`` the original's final-norm output ``[n_t]``; ``R_ss = E[r rᵀ]``, ``C_ts = E[x_t rᵀ]``;
    ``Q = (E_KᵀE_K) ∘ R_ss`` (PSD: a Schur product), ``b = diag(E_Kᵀ E C_ts)``.
    """
    EK, Ed = E_K.double(), E.double()
    Q = (EK.T @ EK) * R_ss.double()
    b = ((EK.T @ Ed) * C_ts.double().T).sum(1)
    return Q, b


# ---- selection: OBS scores from the same moments ---------------------------------------------------------


def obs_scores(W: torch.Tensor, H: torch.Tensor, unit: int = 1, delta: float = DEFAULT_DAMPING) -> torch.Tensor:
    """SlimGPT/OBS importance of each group of ``unit`` input columns: ``Σ_rows W²_{:,j} / [H⁻¹]_jj`` summed per unit.

    The loss in ``E‖W x‖²`` when column j is removed and the rest are refit; higher = more important.
    ``W [out, n]`` (stack the readers that share the input), ``H [n, n]``; returns ``[n / unit]`` float64.
    """
    n = W.shape[1]
    if n % unit:
        raise ValueError(f"{n} columns are not a whole number of units of {unit}")
    L, _ = damped_cholesky(H, delta)
    Hinv_diag = torch.cholesky_inverse(L).diagonal()
    per_col = W.double().pow(2).sum(0) / Hinv_diag
    return per_col.reshape(-1, unit).sum(1)
