"""Activation importance (Minitron) and block influence (ShortGPT), collected by forward hooks on a stock HF model.

One forward pass over calibration text gives, per layer, a per-token statistic for every prunable unit; an
aggregation (:data:`AGGREGATIONS`) turns tokens and samples into one score per unit:

- hidden channel: ``|x|`` of the normalised activations that feed attention and the MLP (both RMSNorm outputs),
  summed over layers;
- query head / KV group: the L2 norm of the attention output of the head (of the group's heads) before ``o_proj``;
- FFN channel: ``|x|`` of the input of ``down_proj`` (``act(gate) * up``);
- layer: block influence ``1 - cos(layer input, layer output)``, averaged over tokens.

Scores come from the HF model; a plan made from them applies to the Megatron checkpoint of the same model too.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .plan import PrunePlan
from .selectors import Scores
from .shape import ModelShape, PruneError, shape_from_hf_config

# Where the statistics are read, as HF module paths inside ``model.model.layers[i]`` (LLaMA, Mistral, Qwen2).
ATTN_NORM = "input_layernorm"  # output [b, s, h]: feeds q/k/v
MLP_NORM = "post_attention_layernorm"  # output [b, s, h]: feeds gate/up
ATTN_OUT = "self_attn.o_proj"  # input [b, s, np*hn]: attention output per head
FFN_ACT = "mlp.down_proj"  # input [b, s, f]: act(gate) * up

DEFAULT_SAMPLES = 64
DEFAULT_SEQ_LEN = 256
DEFAULT_BATCH_SIZE = 8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- aggregation over tokens and samples ---------------------------------------------------------------


class Aggregator:
    """Running aggregate of a non-negative per-token statistic ``[b, s, n]`` into one score per unit ``[n]``."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, stat: torch.Tensor) -> None:
        part, n = self._reduce(stat.float())
        self.total = part if self.total is None else self.total + part
        self.count += n

    def _reduce(self, stat: torch.Tensor) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def result(self) -> torch.Tensor:
        raise NotImplementedError


class MeanL2(Aggregator):
    """Minitron: mean over the sequence, then L2 over samples (RMS over samples, so it does not grow with N)."""

    def _reduce(self, stat):
        return stat.mean(1).pow(2).sum(0), stat.shape[0]

    def result(self):
        return (self.total / self.count).sqrt()


class Mean(Aggregator):
    """Mean over every token of every sample."""

    def _reduce(self, stat):
        return stat.sum((0, 1)), stat.shape[0] * stat.shape[1]

    def result(self):
        return self.total / self.count


class RMS(Aggregator):
    """L2 over every token (root mean square): weights rare large activations more than the mean does."""

    def _reduce(self, stat):
        return stat.pow(2).sum((0, 1)), stat.shape[0] * stat.shape[1]

    def result(self):
        return (self.total / self.count).sqrt()


AGGREGATIONS: dict[str, type[Aggregator]] = {"mean-l2": MeanL2, "mean": Mean, "rms": RMS}
DEFAULT_AGGREGATION = "rms"  # measured: lower pruned perplexity than Minitron's mean-l2 on both width shapes (bench/quality.py)


def aggregator(name: str) -> Aggregator:
    if name not in AGGREGATIONS:
        raise PruneError(f"unknown aggregation {name!r}; choose one of {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[name]()


# ---- per-token statistics ------------------------------------------------------------------------------


def head_norms(attn_out: torch.Tensor, num_units: int) -> torch.Tensor:
    """L2 norm per unit of ``[b, s, units*width]`` -> ``[b, s, units]`` (heads: width hn; groups: hpg*hn)."""
    b, s, _ = attn_out.shape
    return attn_out.float().reshape(b, s, num_units, -1).pow(2).sum(-1).sqrt()


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """``1 - cos(input, output)`` per token ``[b, s, 1]``: 0 for a layer that leaves its input unchanged."""
    cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
    return (1.0 - cos).unsqueeze(-1)


# ---- hooks ---------------------------------------------------------------------------------------------


@dataclass
class LayerStats:
    """The aggregators of one decoder layer."""

    attn_norm: Aggregator
    mlp_norm: Aggregator
    heads: Aggregator
    groups: Aggregator
    ffn: Aggregator
    influence: Aggregator  # always a plain mean over tokens


def _decoder_layers(model) -> Sequence[torch.nn.Module]:
    try:
        return model.model.layers
    except AttributeError as e:
        raise PruneError(f"{type(model).__name__} has no model.layers: not a LLaMA-family HF model") from e


@contextmanager
def importance_hooks(model, shape: ModelShape, agg: str = DEFAULT_AGGREGATION) -> Iterator[list[LayerStats]]:
    """Register the statistics hooks on every decoder layer for the duration of the block; yields their stats."""
    aggregator(agg)  # validate the name before touching the model
    layers = _decoder_layers(model)
    stats = [LayerStats(*(aggregator(agg) for _ in range(5)), Mean()) for _ in layers]
    handles = []

    def output_hook(acc: Aggregator, fn: Callable[[torch.Tensor], torch.Tensor]):
        return lambda mod, args, out: acc.add(fn(out))

    def input_hook(acc: Aggregator, fn: Callable[[torch.Tensor], torch.Tensor]):
        return lambda mod, args: acc.add(fn(args[0]))

    def layer_hook(acc: Aggregator):
        def hook(mod, args, kwargs, out):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = out[0] if isinstance(out, tuple) else out
            acc.add(block_influence(x_in, x_out))

        return hook

    for layer, st in zip(layers, stats):
        sub = dict(layer.named_modules())
        handles += [
            sub[ATTN_NORM].register_forward_hook(output_hook(st.attn_norm, torch.abs)),
            sub[MLP_NORM].register_forward_hook(output_hook(st.mlp_norm, torch.abs)),
            sub[ATTN_OUT].register_forward_pre_hook(input_hook(st.heads, lambda x: head_norms(x, shape.num_attention_heads))),
            sub[ATTN_OUT].register_forward_pre_hook(input_hook(st.groups, lambda x: head_norms(x, shape.num_query_groups))),
            sub[FFN_ACT].register_forward_pre_hook(input_hook(st.ffn, torch.abs)),
            layer.register_forward_hook(layer_hook(st.influence), with_kwargs=True),
        ]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def scores_from_stats(stats: Sequence[LayerStats], agg: str) -> Scores:
    """Stack per-layer aggregates into :class:`Scores` (hidden: summed over both norms of every layer)."""
    if not stats or stats[0].heads.count == 0:
        raise PruneError("no calibration tokens went through the model")
    hidden = torch.stack([s.attn_norm.result() + s.mlp_norm.result() for s in stats]).sum(0)
    return Scores(
        hidden=hidden.cpu(),
        heads=torch.stack([s.heads.result() for s in stats]).cpu(),
        ffn=torch.stack([s.ffn.result() for s in stats]).cpu(),
        groups=torch.stack([s.groups.result() for s in stats]).cpu(),
        layers=torch.cat([s.influence.result() for s in stats]).cpu(),
        method="activation",
    )


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise PruneError(f"--batch-size {batch_size}: must be at least 1")


@torch.no_grad()
def collect_scores(model, shape: ModelShape, windows: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE,
                   agg: str = DEFAULT_AGGREGATION, progress: bool = True) -> Scores:
    """One pass over ``windows`` ``[n, s]`` of token ids with the hooks on; the scores of every unit."""
    from tqdm import tqdm

    check_batch_size(batch_size)
    device = next(model.parameters()).device
    body = getattr(model, "model", model)  # the decoder stack alone: scores need no logits, so skip lm_head
    with importance_hooks(model, shape, agg) as stats:
        for start in tqdm(range(0, windows.shape[0], batch_size), desc="scoring", unit="batch", disable=not progress):
            body(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    return scores_from_stats(stats, agg)


# ---- calibration data ----------------------------------------------------------------------------------


def calibration_windows(ids: torch.Tensor, samples: int, seq_len: int) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens spread evenly over the token stream ``ids``: ``[samples, seq_len]``."""
    if samples < 1 or seq_len < 2:
        raise PruneError(f"--samples {samples} --seq-len {seq_len}: need at least 1 sample of at least 2 tokens")
    n = ids.numel() // seq_len
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


def score_model(folder: Path, texts: Sequence[Path] | None = None, samples: int = DEFAULT_SAMPLES,
                seq_len: int = DEFAULT_SEQ_LEN, batch_size: int = DEFAULT_BATCH_SIZE, device: str = "cpu",
                dtype: str = "float32", agg: str = DEFAULT_AGGREGATION, progress: bool = True,
                layer_by_layer: str = "auto") -> ScoringRun:
    """Load the model in ``folder`` (HF, or Megatron built into its HF model), run calibration text (files, or the
    built-in text) through it, score it. ``layer_by_layer`` (auto, always, never): hold one decoder layer at a time
    (:mod:`.layerwise`); auto does so when the whole model would not fit comfortably on ``device``."""
    import time

    from .evaluate import check_megatron_tokenizer, has_tokenizer, load_hf, load_tokenizer, tokenize
    from .layerwise import collect_scores_layerwise, source_shape, use_layerwise
    from .megatron_ckpt import is_megatron_dir
    from .text import builtin_text, read_texts

    aggregator(agg)
    check_batch_size(batch_size)
    if dtype not in DTYPES:
        raise PruneError(f"--dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PruneError(f"--device {device}: no CUDA device is available here; use --device cpu")
    text = read_texts(list(texts)) if texts else builtin_text("calib")
    shape = source_shape(Path(folder))
    if is_megatron_dir(folder):
        check_megatron_tokenizer(Path(folder))
    elif not has_tokenizer(Path(folder)):
        raise PruneError(f"{folder} has no tokenizer: activation scoring tokenizes calibration text with it")
    layerwise, why = use_layerwise(layer_by_layer, shape, DTYPES[dtype], device)
    if why:
        print(why, flush=True)
    if layerwise:
        windows = calibration_windows(tokenize(load_tokenizer(folder), text, None), samples, seq_len)
        t0 = time.perf_counter()
        scores = collect_scores_layerwise(Path(folder), shape, windows, batch_size, DTYPES[dtype], device, agg,
                                          progress)
    else:
        model, tok = load_hf(folder, DTYPES[dtype], device)
        shape = shape_from_hf_config(model.config.to_dict())
        windows = calibration_windows(tokenize(tok, text, None), samples, seq_len)
        t0 = time.perf_counter()
        scores = collect_scores(model, shape, windows, batch_size, agg, progress)
    meta = {"model": str(folder), "calib": [str(p) for p in texts] if texts else "builtin:calib",
            "samples": samples, "seq_len": seq_len, "tokens": int(windows.numel()), "aggregation": agg,
            "dtype": dtype, "device": device, "seconds": round(time.perf_counter() - t0, 3),
            "shape": shape.to_dict(), "layer_by_layer": layerwise}
    return ScoringRun(scores, meta)


def save_scores(run: ScoringRun, path: Path) -> None:
    """Write scores plus how they were made, atomically (temp file renamed into place)."""
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fields = {f.name: getattr(run.scores, f.name) for f in dataclasses.fields(run.scores)}
    torch.save({**fields, "meta": dict(run.meta)}, tmp)
    os.replace(tmp, path)


def load_scores(path: Path, shape: ModelShape) -> Scores:
    """Scores saved by ``score`` (or :meth:`Scores.save`), checked against the model they will prune."""
    path = Path(path)
    if not path.is_file():
        raise PruneError(f"--scores {path} does not exist; make it with `megatron-prune score`")
    return Scores.load(path).check(shape)


def summary(scores: Scores) -> list[str]:
    """A few lines saying what was collected: the spread of each score and the least influential layers."""
    lines = []
    for name in ("hidden", "heads", "groups", "ffn", "layers"):
        t = getattr(scores, name)
        if t is not None:
            lines.append(f"{name:7s} {str(tuple(t.shape)):12s} min {t.min():.4g}  median {t.median():.4g}  "
                         f"max {t.max():.4g}")
    if scores.layers is not None:
        order = torch.argsort(scores.layers, stable=True)[:5].tolist()
        lines.append("least block influence (first dropped): layers " + ", ".join(map(str, order)))
    return lines


# ---- the prune-time choices this method brings ---------------------------------------------------------

NORM_RESCALES = ("sqrt", "none")


def norm_rescale(plan: PrunePlan, mode: str = "sqrt") -> PrunePlan:
    """Rescale every RMSNorm weight by ``sqrt(h / h')`` when the hidden size shrinks (``mode='sqrt'``).

    RMSNorm divides by the RMS over the kept channels; the dropped ones carried little energy, so that RMS
    grows by about ``sqrt(h / h')`` and every normalised activation shrinks by the same factor. Scaling the
    norm weights back keeps the activations at their trained magnitude (measured in ``bench/quality.py``).
    """
    if mode not in NORM_RESCALES:
        raise PruneError(f"--norm-rescale {mode!r}; choose one of {', '.join(NORM_RESCALES)}")
    h, h2 = plan.source.hidden_size, plan.target.hidden_size
    scale = math.sqrt(h / h2) if mode == "sqrt" and h2 != h else 1.0
    info = {**plan.info, "norm_rescale": mode if h2 != h else "none (hidden kept)", "norm_scale": scale}
    return dataclasses.replace(plan, norm_scale=scale, info=info)


GQA_MODES = ("trim-heads", "drop-groups")


def gqa_query_groups(shape: ModelShape, num_attention_heads: int | None, num_query_groups: int | None,
                     mode: str) -> int | None:
    """The KV-group count implied by ``--gqa`` when only ``--num-attention-heads`` is given.

    ``trim-heads`` keeps every KV group and fewer query heads per group (Minitron); ``drop-groups`` keeps the
    heads per group and drops whole KV groups. Explicit ``--num-query-groups`` always wins.
    """
    if mode not in GQA_MODES:
        raise PruneError(f"--gqa {mode!r}; choose one of {', '.join(GQA_MODES)}")
    if num_query_groups is not None or num_attention_heads is None or shape.heads_per_group == 1:
        return num_query_groups
    if mode == "trim-heads":
        return shape.num_query_groups
    hpg = shape.heads_per_group
    if num_attention_heads % hpg:
        raise PruneError(f"--gqa drop-groups keeps {hpg} heads per KV group, so --num-attention-heads must be a "
                         f"multiple of {hpg}; got {num_attention_heads} (or use --gqa trim-heads)")
    return num_attention_heads // hpg


# ---- the SCORERS entry and the default method ------------------------------------------------------------


def can_score(src: Any, opt: Mapping[str, Any]) -> bool:
    """Activation scores are at hand: a scores file, or a model with a tokenizer to run text through (an HF
    checkpoint, or a Megatron checkpoint whose ``hf_meta/`` holds one)."""
    folder = getattr(src, "folder", None)
    return bool(opt.get("scores")) or (folder is not None and runnable(Path(folder)))


def runnable(folder: Path) -> bool:
    """``folder`` is a model :func:`score_model` can run: an HF config and a tokenizer, or a Megatron checkpoint
    with a tokenizer in ``hf_meta/``."""
    from .evaluate import has_tokenizer
    from .megatron_ckpt import META_DIR, is_megatron_dir

    if is_megatron_dir(folder):
        return has_tokenizer(folder / META_DIR)
    return (folder / "config.json").is_file() and has_tokenizer(folder)


def auto_method(src: Any, opt: Mapping[str, Any]) -> tuple[str, str]:
    """``--method auto``: activation (best by bench/quality.py) where it can run, else random, with the reason."""
    if can_score(src, opt):
        return "activation", "activation importance + block influence"
    return "random", ("the input has no tokenizer to score activations with (for a Megatron checkpoint converted "
                      "elsewhere run `megatron-prune score` on its HF model and pass --scores); falling back to random")


def activation_scorer(src: Any, opt: Mapping[str, Any]) -> Scores:
    """``SCORERS['activation']``: scores from ``--scores FILE``, else computed on ``--calib`` (or built-in) text."""
    if opt.get("scores"):
        return load_scores(opt["scores"], src.shape)
    from .megatron_ckpt import META_DIR, is_megatron_dir

    folder = getattr(src, "folder", None)
    if folder is None or (is_megatron_dir(folder) and not runnable(Path(folder))):
        raise PruneError(f"--method activation runs calibration text through the model, and this input has no "
                         f"tokenizer in {META_DIR}/; run `megatron-prune score --model HF_DIR --output scores.pt` on "
                         f"the HF checkpoint of the same model and pass --scores scores.pt")
    run = score_model(Path(folder), opt.get("calib"), int(opt.get("samples") or DEFAULT_SAMPLES),
                      int(opt.get("seq_len") or DEFAULT_SEQ_LEN), int(opt.get("batch_size") or DEFAULT_BATCH_SIZE),
                      str(opt.get("device") or "cpu"), str(opt.get("dtype") or "float32"),
                      str(opt.get("aggregation") or DEFAULT_AGGREGATION), not opt.get("no_progress"),
                      str(opt.get("layer_by_layer") or "auto"))
    return run.scores
