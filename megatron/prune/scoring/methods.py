"""The scoring methods behind ``prune --method`` and ``score``: random (the seed project's), magnitude (weight
norms) and activation (importance and block influence on calibration text, :mod:`.stats`), the ``auto`` rule, and the
scores file ``score`` writes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from megatron.prune.core.select import Scores
from megatron.prune.core.shape import ModelShape, shape_from_hf_config
from megatron.prune.errors import PruneError
from megatron.prune.formats.folder import ModelFolder, as_model_folder, has_tokenizer, model_kind
from megatron.prune.formats.mcore.schema import META_DIR
from megatron.prune.formats.source import TensorSource
from megatron.prune.runtime import DTYPES
from megatron.prune.scoring.stats import (DEFAULT_AGGREGATION, DEFAULT_BATCH_SIZE, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN,
                                          aggregator, check_batch_size, collect_scores)



@dataclass(frozen=True)
class ScoringOptions:
    """How scores are computed: the selection and calibration flags of ``prune`` and ``score``."""

    seed: int = 0  # random
    progress: bool = True
    scores: Path | None = None  # activation: scores from `megatron-prune score` instead of a calibration pass
    calib: tuple[Path, ...] | None = None  # calibration text files; None: the built-in text
    samples: int = DEFAULT_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    batch_size: int = DEFAULT_BATCH_SIZE
    device: str = "auto"  # cuda where a GPU is available, else cpu
    dtype: str = "float32"
    aggregation: str = DEFAULT_AGGREGATION
    layer_by_layer: str = "auto"


def calibration_windows(ids: torch.Tensor, samples: int, seq_len: int) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens spread evenly over the token stream ``ids``: ``[samples, seq_len]``."""
    if samples < 1 or seq_len < 2:
        raise PruneError(f"--samples {samples} --seq-len {seq_len}: need at least 1 sample of at least 2 tokens")
    n = ids.numel() // seq_len
    if n == 0:
        raise PruneError(f"calibration text has {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}; "
                         "give more text (--calib)" + (f" or a --seq-len of at most {ids.numel()}"
                                                       if ids.numel() >= 2 else ""))
    if n < samples:
        raise PruneError(f"calibration text has {ids.numel()} tokens: {n} windows of --seq-len {seq_len}, fewer "
                         f"than --samples {samples}; give more text or lower --samples/--seq-len (at most {n})")
    pick = torch.linspace(0, n - 1, samples).round().long()
    return ids[: n * seq_len].view(n, seq_len)[pick]


@dataclass(frozen=True)
class ScoringRun:
    """The scores and how they were obtained (what ``score`` prints and saves beside them)."""

    scores: Scores
    meta: Mapping[str, Any]


def score_model(folder: Path, options: ScoringOptions = ScoringOptions()) -> ScoringRun:
    """Load the model in ``folder`` (HF, or Megatron built into its HF model), run calibration text (``options.calib``
    files, or the built-in text) through it, score it. ``options.layer_by_layer`` (auto, always, never): hold one
    decoder layer at a time (:mod:`.layerwise`); auto does so when the whole model would not fit comfortably on the
    device."""
    import time

    from megatron.prune.runtime import check_megatron_tokenizer, load_hf, load_tokenizer, resolve_device, tokenize
    from megatron.prune.scoring.layerwise import collect_scores_layerwise, source_shape, use_layerwise
    from megatron.prune.text import builtin_text, read_texts

    o = options
    texts, samples, seq_len, batch_size, device, dtype, agg = (o.calib, o.samples, o.seq_len, o.batch_size, o.device,
                                                               o.dtype, o.aggregation)
    aggregator(agg)
    check_batch_size(batch_size)
    if dtype not in DTYPES:
        raise PruneError(f"--dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    device = resolve_device(device)
    text = read_texts(list(texts), "--calib") if texts else builtin_text("calib")
    shape = source_shape(Path(folder))
    if as_model_folder(folder).kind == "megatron":
        check_megatron_tokenizer(Path(folder))
    elif not has_tokenizer(Path(folder)):
        raise PruneError(f"{folder} has no tokenizer: activation scoring tokenizes calibration text with it")
    layerwise, why = use_layerwise(o.layer_by_layer, shape, DTYPES[dtype], device)
    if why:
        print(why, flush=True)
    if layerwise:
        windows = calibration_windows(tokenize(load_tokenizer(folder), text, None, shape.vocab_size), samples, seq_len)
        t0 = time.perf_counter()
        scores = collect_scores_layerwise(Path(folder), shape, windows, batch_size, DTYPES[dtype], device, agg,
                                          o.progress)
    else:
        model, tok = load_hf(folder, DTYPES[dtype], device)
        shape = shape_from_hf_config(model.config.to_dict())
        windows = calibration_windows(tokenize(tok, text, None, shape.vocab_size), samples, seq_len)
        t0 = time.perf_counter()
        scores = collect_scores(model, shape, windows, batch_size, agg, o.progress)
    scores.check(shape)  # NaN/Inf scores (activations overflowed in float16?) would select arbitrary units
    meta = {"model": str(folder), "calib": [str(p) for p in texts] if texts else "builtin:calib",
            "samples": samples, "seq_len": seq_len, "tokens": int(windows.numel()), "aggregation": agg,
            "dtype": dtype, "device": device, "seconds": round(time.perf_counter() - t0, 3),
            "shape": shape.to_dict(), "layer_by_layer": layerwise}
    return ScoringRun(scores, meta)


def save_scores(run: ScoringRun, path: Path) -> None:
    """Write scores plus how they were made, atomically (temp file renamed into place)."""
    import io

    from megatron.prune.io.atomic import atomic_file

    fields = {f.name: getattr(run.scores, f.name) for f in dataclasses.fields(run.scores)}
    buf = io.BytesIO()  # small; written by Python, so a full disk is an OSError, not torch's RuntimeError
    torch.save({**fields, "meta": dict(run.meta)}, buf)
    with atomic_file(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def load_scores(path: Path, shape: ModelShape) -> Scores:
    """Scores saved by ``score`` (or :meth:`Scores.save`), checked against the model they will prune."""
    path = Path(path)
    if path.is_dir():
        raise PruneError(f"--scores {path} is a folder; give the scores file `megatron-prune score` wrote")
    if not path.is_file():
        raise PruneError(f"--scores {path} does not exist; make it with `megatron-prune score`")
    return Scores.load(path).check(shape)


def summary(scores: Scores) -> list[str]:
    """A few lines saying what was collected: the spread of each score and the least influential layers."""
    lines = []
    for name in ("hidden", "heads", "groups", "ffn", "layers", "experts", "routing"):
        t = getattr(scores, name)
        if t is not None and t.numel():  # a MoE model's dense FFN scores are [L, 0]
            lines.append(f"{name:7s} {str(tuple(t.shape)):12s} min {t.min():.4g}  median {t.median():.4g}  "
                         f"max {t.max():.4g}")
    if scores.layers is not None:
        order = torch.argsort(scores.layers, stable=True)[:5].tolist()
        lines.append("least block influence (first dropped): layers " + ", ".join(map(str, order)))
    return lines


# ---- the scoring methods -------------------------------------------------------------------------------


def random_scores(shape: ModelShape, seed: int = 0) -> Scores:
    """Seeded random scores: the seed project's method (same seed, same plan)."""
    g = torch.Generator().manual_seed(seed)
    L = shape.num_layers
    dense = dict(
        hidden=torch.rand(shape.hidden_size, generator=g),
        heads=torch.rand(L, shape.num_attention_heads, generator=g),
        ffn=torch.rand(L, shape.ffn_hidden_size, generator=g),
        groups=torch.rand(L, shape.num_query_groups, generator=g),
    )
    moe = {}
    if shape.is_moe:  # drawn after the dense scores: a dense model's random plan is as before
        moe = dict(experts=torch.rand(L, shape.num_experts, generator=g),
                   expert_ffn=torch.rand(L, shape.num_experts, shape.moe_ffn_hidden_size, generator=g))
    return Scores(**dense, **moe, method="random")


def _sq_rows(t: torch.Tensor, unit: int = 1) -> torch.Tensor:
    """Sum of squares per block of ``unit`` rows: [n*unit, k] -> [n]."""
    t = t.float()
    return t.pow(2).reshape(-1, unit * t.shape[1] if t.dim() == 2 else unit).sum(1)


def _expert_magnitudes(src: TensorSource, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A MoE layer's squared weight norms per hidden channel ``[h]``, and the L2 norms per expert ``[E]`` (its router
    row and FFN) and per expert FFN channel ``[E, F]``."""
    router = src.get("router", layer)
    hidden = _sq_rows(router.t())
    channels = []
    for e in range(src.shape.num_experts):
        gate, up, down = (src.get(r, layer, e) for r in ("expert_gate", "expert_up", "expert_down"))
        hidden += _sq_rows(gate.t()) + _sq_rows(up.t()) + _sq_rows(down)
        channels.append(_sq_rows(gate) + _sq_rows(up) + _sq_rows(down.t()))
    sq = torch.stack(channels)  # [E, F]
    return hidden, (sq.sum(1) + _sq_rows(router)).sqrt(), sq.sqrt()


def magnitude_scores(src: TensorSource, progress: Callable[[Any], Any] = iter) -> Scores:
    """L2 norm of every weight coupled to each unit (channel, head, group, FFN channel)."""
    s = src.shape
    hn = s.head_dim
    hidden = _sq_rows(src.get("embed").t())
    if src.has("lm_head"):
        hidden += _sq_rows(src.get("lm_head").t())
    heads, groups, ffn, experts, expert_ffn = [], [], [], [], []
    for layer in progress(range(s.num_layers)):
        q, k, v, o = (src.get(r, layer) for r in ("q", "k", "v", "o"))
        head = _sq_rows(q, hn) + _sq_rows(o.t(), hn)
        heads.append(head.sqrt())
        grp = _sq_rows(k, hn) + _sq_rows(v, hn) + head.reshape(s.num_query_groups, -1).sum(1)
        groups.append(grp.sqrt())
        if s.is_moe:
            for t in (q, k, v):
                hidden += _sq_rows(t.t())
            hidden += _sq_rows(o)
            moe_hidden, expert, channel = _expert_magnitudes(src, layer)
            hidden += moe_hidden
            experts.append(expert)
            expert_ffn.append(channel)
            ffn.append(torch.zeros(0))
            continue
        gate, up, down = (src.get(r, layer) for r in ("gate", "up", "down"))
        for t in (q, k, v, gate, up):
            hidden += _sq_rows(t.t())
        for t in (o, down):
            hidden += _sq_rows(t)
        ffn.append((_sq_rows(gate) + _sq_rows(up) + _sq_rows(down.t())).sqrt())
    moe = dict(experts=torch.stack(experts), expert_ffn=torch.stack(expert_ffn)) if s.is_moe else {}
    return Scores(hidden.sqrt(), torch.stack(heads), torch.stack(ffn), torch.stack(groups), method="magnitude", **moe)


def can_score(src: TensorSource, opt: ScoringOptions) -> bool:
    """Activation scores are at hand: a scores file, or a model with a tokenizer to run text through (an HF
    checkpoint, or a Megatron checkpoint whose ``hf_meta/`` holds one)."""
    return opt.scores is not None or runnable(Path(src.folder))


def runnable(folder: Path) -> bool:
    """``folder`` is a model :func:`score_model` can run: an HF config and a tokenizer, or a Megatron checkpoint
    with a tokenizer in ``hf_meta/``."""
    kind = model_kind(folder)
    return kind is not None and ModelFolder(folder, kind).has_tokenizer()


def auto_method(src: TensorSource, opt: ScoringOptions) -> tuple[str, str]:
    """``--method auto``: activation (best by bench/quality.py) where it can run, else random, with the reason."""
    if can_score(src, opt):
        return "activation", "activation importance + block influence"
    return "random", ("the input has no tokenizer to score activations with (for a Megatron checkpoint converted "
                      "elsewhere run `megatron-prune score` on its HF model and pass --scores); falling back to random")


def method_settings(method: str, opt: ScoringOptions) -> dict[str, Any]:
    """What a plan records of how its scores were made (``megatron-prune plan show`` prints it)."""
    if method == "random":
        return {"seed": opt.seed}
    if method == "activation" and opt.scores is not None:
        return {"scores": str(opt.scores)}
    if method == "activation":
        return {"calib": [str(p) for p in opt.calib] if opt.calib else "builtin:calib", "samples": opt.samples,
                "seq_len": opt.seq_len, "aggregation": opt.aggregation, "dtype": opt.dtype}
    return {}


def activation_scorer(src: TensorSource, opt: ScoringOptions) -> Scores:
    """``SCORERS['activation']``: scores from ``--scores FILE``, else computed on ``--calib`` (or built-in) text."""
    if opt.scores is not None:
        return load_scores(opt.scores, src.shape)
    folder = Path(src.folder)
    if as_model_folder(folder).kind == "megatron" and not runnable(folder):
        raise PruneError(f"--method activation runs calibration text through the model, and this input has no "
                         f"tokenizer in {META_DIR}/; run `megatron-prune score --model HF_DIR --output scores.pt` on "
                         f"the HF checkpoint of the same model and pass --scores scores.pt")
    return score_model(folder, opt).scores


def _progress(desc: str, quiet: bool) -> Callable[[Any], Any]:
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, unit="layer", disable=quiet)


# method name -> scorer(source, options)
SCORERS: dict[str, Callable[[TensorSource, ScoringOptions], Scores]] = {
    "random": lambda src, opt: random_scores(src.shape, opt.seed),
    "magnitude": lambda src, opt: magnitude_scores(src, _progress("magnitude", not opt.progress)),
    "activation": activation_scorer,
}
