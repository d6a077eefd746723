"""What ``prune --reconstruct least-squares`` runs around the refit: the checks before any work, the calibration
windows, the scratch store beside the output, and the record of what was done in the plan's info."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from megatron.prune.core.plan import PrunePlan
from megatron.prune.core.shape import ModelShape
from megatron.prune.errors import PruneError
from megatron.prune.formats.source import TensorSource
from megatron.prune.refit.layer import GROUPS
from megatron.prune.refit.sequential import DEPTH, HEADS, FusedSelection, RefitOptions, RefitSummary, refit_model
from megatron.prune.refit.solve import SingularMomentError
from megatron.prune.refit.store import RefitStore
from megatron.prune.scoring.methods import ScoringOptions

RECONSTRUCT = ("least-squares", "none")
CALIBRATED = ("activation",)  # selection methods that run calibration text anyway


def default_reconstruct(method: str) -> str:
    """``--reconstruct`` when not given: least-squares wherever calibration runs for the selection."""
    return "least-squares" if method in CALIBRATED else "none"


def min_tokens(target: ModelShape) -> int:
    """Calibration tokens the refit needs: as many as the widest input a refit linear reads (hidden, the kept heads'
    concatenation, FFN channels), or that input's second moment is singular and the damping alone decides."""
    return max(target.hidden_size, target.num_attention_heads * target.head_dim, target.ffn_hidden_size)


def check_reconstruct(src: TensorSource, reconstruct: str, method: str | None, calib: tuple[Path, ...] | None,
                      options: RefitOptions, target: ModelShape, scoring: ScoringOptions) -> None:
    """Refuse a refit that cannot run, before scoring or writing anything. ``method`` is the selection's (None: a
    saved plan's, refit on --calib or the built-in text)."""
    from megatron.prune.scoring.methods import runnable

    if reconstruct not in RECONSTRUCT:
        raise PruneError(f"--reconstruct {reconstruct!r}: choose one of {', '.join(RECONSTRUCT)}")
    if reconstruct == "none":
        return
    if not (options.damping > 0 and math.isfinite(options.damping)):
        raise PruneError(f"--damping {options.damping}: must be > 0 and finite (a multiple of the moments' mean "
                         "diagonal)")
    unknown = [g for g in options.groups if g not in GROUPS]
    if unknown or options.head not in HEADS or options.depth not in DEPTH:
        raise PruneError(f"refit groups {unknown or list(options.groups)} / head {options.head!r} / depth "
                         f"{options.depth!r}: choose groups from {', '.join(GROUPS)}, the head from "
                         f"{', '.join(HEADS)}, the depth from {', '.join(DEPTH)}")
    if not runnable(Path(src.folder)):
        raise PruneError(f"--reconstruct least-squares runs calibration text through the model, and {src.folder} has "
                         "no tokenizer (an HF folder's own, or a Megatron checkpoint's hf_meta/); use --reconstruct "
                         "none, or convert the checkpoint from an HF folder that has one")
    tokens, need = scoring.samples * scoring.seq_len, min_tokens(target)
    if tokens < need:
        raise PruneError(f"--reconstruct least-squares on --samples {scoring.samples} x --seq-len {scoring.seq_len} = "
                         f"{tokens} calibration tokens: the refit of a {need}-wide input needs at least {need} tokens "
                         f"(e.g. --samples {-(-need // scoring.seq_len)}); or use --reconstruct none")
    if method is not None and method not in CALIBRATED and not calib:
        raise PruneError(f"--reconstruct least-squares with --method {method}: the refit needs calibration text, which "
                         "this method does not use; pass --calib FILE (the text to refit on), or use --method "
                         "activation (the built-in text by default)")


def reconstruct(src: TensorSource, plan: PrunePlan, scoring: ScoringOptions, options: RefitOptions,
                scratch: Path, select: FusedSelection | None = None
                ) -> tuple[RefitStore | None, RefitSummary | None, PrunePlan]:
    """Refit ``plan`` applied to ``src`` on the calibration text of ``scoring`` into a store in ``scratch``; the plan,
    its info recording how. A plan that keeps everything needs no refit (the output stays the input, bit for bit).
    With ``select`` the plan gives the counts and the refit chooses the units; the plan returned holds its choice."""
    from megatron.prune.runtime import DTYPES, load_tokenizer, tokenize, transformers_config
    from megatron.prune.scoring.methods import calibration_windows
    from megatron.prune.text import builtin_text, read_texts

    if plan.is_identity():
        return None, None, plan
    text = read_texts(list(scoring.calib), "--calib") if scoring.calib else builtin_text("calib")
    ids = tokenize(load_tokenizer(src.folder), text, None, src.shape.vocab_size)
    windows = calibration_windows(ids, scoring.samples, scoring.seq_len)
    store = RefitStore(scratch)
    try:
        summary = refit_model(src, transformers_config(src), plan, windows, scoring.batch_size, DTYPES[scoring.dtype],
                              scoring.device, store, options, scoring.progress, select)
    except SingularMomentError as e:
        raise PruneError(f"--reconstruct least-squares: {e}; give more (or more varied) calibration text "
                         f"(--calib, --samples){'' if e.zero else ' or raise --damping'}, or use --reconstruct none"
                         ) from None
    if select is not None:
        plan = dataclasses.replace(plan, layers=tuple(summary.layer_plans)).validate()
    sliced, refit = summary.mean_error()
    info = {"method": "least-squares", "damping": options.damping, "groups": list(options.groups),
            "head": options.head, "calib": [str(p) for p in scoring.calib] if scoring.calib else "builtin:calib",
            "samples": scoring.samples, "seq_len": scoring.seq_len, "batch_size": scoring.batch_size,
            "dtype": scoring.dtype,
            "tokens": summary.tokens, "error_sliced": round(sliced, 6), "error_refit": round(refit, 6),
            "seconds": round(summary.seconds, 2)}
    if summary.loss is not None:
        info["calibration_loss"] = {"original": round(summary.loss[0], 5), "pruned_refit": round(summary.loss[1], 5),
                                    "tokens": summary.loss[2]}
    if summary.head is not None:
        info["head_refit"] = {"role": summary.head_role, "error_sliced": round(summary.head[0], 6),
                              "error_refit": round(summary.head[1], 6)}
    return store, summary, dataclasses.replace(plan, info={**plan.info, "reconstruct": info})


def describe(summary: RefitSummary) -> str:
    """One line saying what the refit did."""
    sliced, refit = summary.mean_error()
    head = "" if summary.head is None else (f"; {'lm_head' if summary.head_role == 'lm_head' else 'final norm gain'}"
                                            f" {summary.head[0]:.4f} -> {summary.head[1]:.4f}")
    loss = "" if summary.loss is None else (f"; calibration loss {summary.loss[0]:.3f} (original), "
                                            f"{summary.loss[1]:.3f} (pruned, refit) on {summary.loss[2]} tokens")
    return (f"reconstruct: {len(summary.layers)} layers refit on {summary.tokens} calibration tokens in "
            f"{summary.seconds:.1f}s; relative error of the refit linears {sliced:.4f} (sliced) -> {refit:.4f}{head}"
            f"{loss}")
