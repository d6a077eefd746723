"""Least-squares weight reconstruction after structured pruning: the math, as small pure torch functions.

A linear ``y = W x`` that *reads* a pruned axis loses the dropped input channels P and keeps K. With the
second moment ``H = E[x xᵀ]`` of its input on calibration tokens, the weights that best reproduce ``W x`` from
``x_K`` alone are ``W_K + W_P H_PK H_KK⁻¹``. When the pruned model's input ``x_s`` is no longer a slice of the
original input ``x_t`` (upstream layers were pruned too), the same least squares reads
``W' = E[y x_sᵀ] E[x_s x_sᵀ]⁻¹`` with ``y = W x_t`` (:func:`solve_from_moments`); it reduces to the first formula
when ``x_s = x_t[K]``. Damping is a ridge toward the plainly sliced weights, so it never shrinks them toward zero.

Conventions: weights are ``[out, in]`` (torch ``Linear``); activations are ``[tokens, n]``; moments are float64.
Nothing here knows about models, checkpoints or plans.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_DAMPING = 0.01  # δ: ridge of δ·mean(diag H); measured against 0.001 and 0.1 by bench/quality.py
MAX_DAMPING = 1.0  # the damping fallback gives up beyond this δ


class SingularMomentError(ValueError):
    """A moment matrix stays singular (or is not a finite PSD matrix) even with the largest damping; ``zero``: it is
    the zero matrix (the input is 0 on every token), which no damping helps."""

    def __init__(self, message: str, zero: bool = False) -> None:
        super().__init__(message)
        self.zero = zero


# ---- moments ---------------------------------------------------------------------------------------------


def _block(n: int) -> int:
    return 128 if n <= 768 else 256


def gram_lower_(acc: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``acc += aᵀa`` on the lower triangle (and the whole diagonal blocks) of ``acc [n, n]`` for ``a [T, n]``, by
    column blocks: ~3/4 of the full product's work at n ≈ 500, ~5/8 at n ≥ 1000 (torch has no symmetric rank-k
    product), and no ``[n, n]`` temporary (an FFN of 28,672 channels would need 3 GB for each)."""
    n = a.shape[1]
    block = _block(n)
    for i in range(0, n, block):
        acc[i:, i:i + block] += a[:, i:].T @ a[:, i:i + block]
    return acc


def mirror_lower_(m: torch.Tensor) -> torch.Tensor:
    """Copy the lower triangle of ``m [n, n]`` onto its upper triangle, in place: exactly symmetric."""
    block = _block(m.shape[0])
    for i in range(0, m.shape[0], block):
        d = m[i:i + block, i:i + block]
        d.copy_(d.tril() + d.tril(-1).T)
        m[i:i + block, i + block:] = m[i + block:, i:i + block].T
    return m


def gram(a: torch.Tensor) -> torch.Tensor:
    """``aᵀa`` for ``a [T, n]`` (in ``a``'s dtype), computed as a lower triangle and mirrored: exactly symmetric,
    which a plain ``aᵀa`` need not be."""
    n = a.shape[1]
    return mirror_lower_(gram_lower_(torch.zeros(n, n, dtype=a.dtype, device=a.device), a))


class Moment:
    """Running ``E[a bᵀ]`` over token batches ``a [T, n]``, ``b [T, m]`` (``b`` omitted: ``E[a aᵀ]``, accumulated as a
    lower triangle), summed in float64.

    ``product`` is the dtype of each batch's matmul: float64 is exact; float32 is 2x faster on CPU and, summed
    per batch into float64, loses nothing the damping would not swamp (relative error ~1e-6 per batch). Each batch
    is added block by block into the float64 sum: no ``[n, m]`` temporary beyond it.
    """

    def __init__(self, product: torch.dtype = torch.float64) -> None:
        self.sum: torch.Tensor | None = None
        self.count = 0
        self.product = product
        self.symmetric = False

    def add(self, a: torch.Tensor, b: torch.Tensor | None = None) -> None:
        """Accumulate one batch (leading dims are flattened into tokens)."""
        a = a.reshape(-1, a.shape[-1]).to(self.product)
        if b is None:
            if self.sum is None:
                self.sum, self.symmetric = a.new_zeros(a.shape[1], a.shape[1], dtype=torch.float64), True
            gram_lower_(self.sum, a)
        else:
            b = b.reshape(-1, b.shape[-1]).to(self.product)
            if a.shape[0] != b.shape[0]:
                raise ValueError(f"moment of {a.shape[0]} tokens against {b.shape[0]}")
            if self.sum is None:
                self.sum = (a.T @ b).double()
            else:
                self.sum += a.T @ b
        self.count += a.shape[0]

    def mean(self) -> torch.Tensor:
        """The moment ``E[a bᵀ]`` (float64)."""
        if self.sum is None or self.count == 0:
            raise SingularMomentError("no calibration tokens were accumulated")
        out = self.sum / self.count
        return mirror_lower_(out) if self.symmetric else out

    def pop_mean(self) -> torch.Tensor:
        """:meth:`mean`, computed in place of the sum, which the moment gives up (it is empty afterwards): one
        ``[n, m]`` float64 at the peak instead of two (3.3 GB for a 70B layer's 14k-channel down_proj input)."""
        if self.sum is None or self.count == 0:
            raise SingularMomentError("no calibration tokens were accumulated")
        out, self.sum = self.sum.div_(self.count), None
        self.count = 0
        return mirror_lower_(out) if self.symmetric else out


def damp(H: torch.Tensor, delta: float) -> torch.Tensor:
    """``H + δ·mean(diag H)·I``: the usual relative damping (SparseGPT), so δ is scale-free. A new tensor."""
    out = H.clone()
    out.diagonal().add_(delta * H.diagonal().mean())
    return out


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
    if H.numel() and not H.diagonal().any():  # PSD with a zero diagonal: all zero, and δ·mean(diag) adds nothing
        raise SingularMomentError(f"moment matrix {tuple(H.shape)} is zero: its input is 0 on every calibration "
                                  "token, so there is nothing to refit on", zero=True)
    d = float(delta)
    while True:
        A = damp(H, d)
        info = torch.empty((), dtype=torch.int32, device=A.device)
        L, info = torch.linalg.cholesky_ex(A, out=(A, info))  # in place: no third [n, n]
        if int(info) == 0:
            return L, d
        if d >= max_delta:
            scale = float(H.diagonal().mean()) if H.numel() else 0.0
            raise SingularMomentError(f"moment matrix {tuple(H.shape)} is singular even with damping "
                                      f"δ={d:g} (mean diagonal {scale:.3g}): no usable calibration signal")
        d = max(d, 1e-6) * 10
        d = min(d, max_delta)


# ---- least-squares refits ----------------------------------------------------------------------------------


# output rows solved (and scored) at a time: the right-hand side, prior and solution of a block are each
# ROW_BLOCK x n float64 (128 MiB at n = 4096), where a whole 28,672-row gate_up of a 70B layer, or a 128k-entry head,
# would need GBs for each
ROW_BLOCK = 4096


@dataclass(frozen=True)
class Ridge:
    """``H_ss = E[x_s x_sᵀ]`` factored once, with its ridge λ = δ·mean(diag H_ss), so output rows can be solved
    (:meth:`solve`) and scored (:meth:`errors`) block by block: each row of ``W'`` is its own least squares."""

    L: torch.Tensor  # Cholesky factor of H_ss + λI (float64)
    lam: torch.Tensor  # λ (a float64 scalar)
    H: torch.Tensor  # H_ss in float32, for the error report

    @classmethod
    def factor(cls, H_ss: torch.Tensor, delta: float = DEFAULT_DAMPING) -> Ridge:
        L, d = damped_cholesky(H_ss, delta)
        return cls(L, d * H_ss.double().diagonal().mean(), H_ss.float())

    def solve(self, C_ys: torch.Tensor, prior: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(C_ys + λ prior)(H_ss + λI)⁻¹`` for the rows of ``C_ys`` and ``prior``, solved in float64, returned as
        ``dtype`` (default prior's)."""
        rhs = prior.to(torch.float64, copy=True).mul_(self.lam).add_(C_ys)
        return torch.cholesky_solve(rhs.T, self.L).T.to(dtype or prior.dtype)

    def errors(self, Ws: list[torch.Tensor], C_ys: torch.Tensor) -> list[float]:
        """``E‖W x_s − y‖² − E‖y‖²`` for each ``W`` (rows matching ``C_ys``): :func:`reconstruction_errors` without
        its constant, so the errors of row blocks add up."""
        return cross_terms(Ws, self.H, C_ys.float())

    def solve_scored(self, C_ys: torch.Tensor, prior: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """:meth:`solve` (float64) and the :meth:`errors` of ``[prior, solution]``. The solution's term needs no
        product with ``H``: from ``W'(H + λI) = C + λ·prior``, ``tr(W' H W'ᵀ) − 2 tr(W' Cᵀ)`` is
        ``Σ W' ∘ (λ(prior − W') − C)``, which saves half the report's work (``[out, n] @ [n, n]`` per block)."""
        new = self.solve(C_ys, prior, torch.float64)
        refit = float((new * (prior.double() - new).mul_(self.lam).sub_(C_ys)).sum())
        return new, [self.errors([prior], C_ys)[0], refit]


def refit_rows(weight: torch.Tensor, ridge: Ridge, targets, storage: torch.dtype | None) -> list[float]:
    """Refit ``weight [out, n_s]`` in place, :data:`ROW_BLOCK` rows at a time (``targets(r0, r1)``: ``E[y x_sᵀ]`` of
    those rows), each block rounded to ``storage`` as it will be written; the (sliced, refit) error terms summed over
    the blocks (:meth:`Ridge.errors`)."""
    total = [0.0, 0.0]
    for r0 in range(0, weight.shape[0], ROW_BLOCK):
        r1 = min(r0 + ROW_BLOCK, weight.shape[0])
        C_ys, prior = targets(r0, r1), weight[r0:r1].float()
        new, terms = ridge.solve_scored(C_ys, prior)
        total = [t + e for t, e in zip(total, terms)]
        weight[r0:r1].copy_(new.to(storage or weight.dtype).to(weight.dtype))
    return total


def refit_to_targets(weight: torch.Tensor, xs: list[torch.Tensor], ys: list[torch.Tensor],
                     delta: float = DEFAULT_DAMPING, storage: torch.dtype | None = None,
                     product: torch.dtype = torch.float32) -> tuple[list[float], float, int]:
    """Refit ``weight [out, n]`` in place so that ``weight @ x`` best gives ``y`` over the batches ``xs``, ``ys``
    (ridge toward its current weights); its (sliced, refit) error terms, ``E‖y‖²`` and the tokens seen."""
    H, C = Moment(product), Moment(product)
    energy, tokens = 0.0, 0
    for x, y in zip(xs, ys, strict=True):
        H.add(x)
        C.add(y, x)
        yf = y.float().reshape(-1)
        energy += float(yf @ yf)
        tokens += y.numel() // y.shape[-1]
    ridge, C_ys = Ridge.factor(H.pop_mean(), delta), C.pop_mean()
    with torch.no_grad():
        terms = refit_rows(weight, ridge, lambda r0, r1: C_ys[r0:r1], storage)
    return terms, energy / tokens, tokens


@dataclass
class GroupReport:
    """How well a refit group reproduces the original on calibration tokens: ``E‖W x_s − W_t x_t‖²`` relative to
    ``E‖W_t x_t‖²``, with the plainly sliced weights and with the refitted ones."""

    sliced: float
    refit: float

    @classmethod
    def relative(cls, terms: list[float], energy: float) -> GroupReport:
        """From the (sliced, refit) error terms of :meth:`Ridge.errors` and ``E‖y‖²``; an error is never negative
        (a sum of squares: rounding below 0 where it is 0 printed as -0.0000)."""
        scale = max(energy, 1e-30)
        return cls(*(max((e + energy) / scale, 0.0) for e in terms))


def solve_from_moments(C_ys: torch.Tensor, H_ss: torch.Tensor, prior: torch.Tensor,
                       delta: float = DEFAULT_DAMPING, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``argmin_W' E‖W' x_s − y‖² + λ‖W' − prior‖²`` = ``(C_ys + λ prior)(H_ss + λI)⁻¹``, λ = δ·mean(diag H_ss).

    ``C_ys = E[y x_sᵀ] [out, n_s]``, ``H_ss = E[x_s x_sᵀ]``, ``prior [out, n_s]`` (the plainly sliced weights);
    returns ``dtype`` (default prior's), solved in float64 whatever prior's dtype. The ridge pulls toward ``prior``
    rather than zero.
    """
    return Ridge.factor(H_ss, delta).solve(C_ys, prior, dtype)


def cross_terms(Ws: list[torch.Tensor], H: torch.Tensor, C: torch.Tensor) -> list[float]:
    """``tr(W H Wᵀ) − 2 tr(W Cᵀ)`` for each ``W``, in float32 products summed in float64 (a report, not a solve)."""
    out = []
    for W in Ws:
        W = W.float()
        out.append(float(((W @ H) * W).sum(dtype=torch.float64) - 2 * (W * C).sum(dtype=torch.float64)))
    return out


def reconstruction_errors(Ws: list[torch.Tensor], H_ss: torch.Tensor, C_ys: torch.Tensor,
                          yy: torch.Tensor | float) -> list[float]:
    """``E‖W x_s − y‖²`` for each ``W``, from moments: ``tr(W H Wᵀ) − 2 tr(W C_ysᵀ) + E‖y‖²`` (``yy``: ``E‖y‖²`` or
    ``E[y yᵀ]``). The products run in float32 (a report, not a solve), the moments converted once for all ``Ws``."""
    y2 = float(yy.double().trace()) if torch.is_tensor(yy) and yy.dim() == 2 else float(yy)
    return [e + y2 for e in cross_terms(Ws, H_ss.float(), C_ys.float())]


def reconstruction_error(W: torch.Tensor, H_ss: torch.Tensor, C_ys: torch.Tensor, yy: torch.Tensor | float) -> float:
    """:func:`reconstruction_errors` of one ``W``."""
    return reconstruction_errors([W], H_ss, C_ys, yy)[0]


# ---- tied embeddings: a diagonal refit of the final norm ----------------------------------------------------


def fit_diagonal(Q: torch.Tensor, b: torch.Tensor, prior: torch.Tensor, delta: float = DEFAULT_DAMPING) -> torch.Tensor:
    """``argmin_g gᵀQg − 2bᵀg + λ‖g − prior‖²`` = ``(Q + λI)⁻¹ (b + λ prior)``: a per-channel gain by least squares."""
    L, d = damped_cholesky(Q, delta)
    lam = d * Q.double().diagonal().mean()
    return torch.cholesky_solve((b.double() + lam * prior.double())[:, None], L)[:, 0].to(prior.dtype)


def logit_gain_moments(G: torch.Tensor, kept: torch.Tensor, R_ss: torch.Tensor,
                       C_ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, b)`` of :func:`fit_diagonal` for ``min E‖E_K diag(g) r − E x_t‖²`` (tied head, gain g on kept channels).

    ``G = EᵀE [n_t, n_t]`` of the head ``E [vocab, n_t]`` (accumulated over row blocks: the head itself is never
    needed whole), ``kept`` the kept channels K; ``r`` is the pruned model's final hidden state normalised but not yet
    scaled by the norm gain ``[n_s]``, ``x_t`` the original's final-norm output ``[n_t]``; ``R_ss = E[r rᵀ]``,
    ``C_ts = E[x_t rᵀ]``; ``Q = G_KK ∘ R_ss`` (PSD: a Schur product), ``b = diag(E_Kᵀ E C_ts) = (G_K: ∘ C_tsᵀ)·1``.
    """
    G_K = G.double().index_select(0, kept)
    Q = G_K.index_select(1, kept) * R_ss.double()
    b = (G_K * C_ts.double().T).sum(1)
    return Q, b
