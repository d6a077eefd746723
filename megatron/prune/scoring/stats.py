"""Activation importance (Minitron) and block influence (ShortGPT), collected by forward hooks on a stock HF model.

One forward pass over calibration text gives, per layer, a per-token statistic for every prunable unit; an
aggregation (:data:`AGGREGATIONS`) turns tokens and samples into one score per unit:

- hidden channel: ``|x|`` of the normalised activations that feed attention and the MLP (both RMSNorm outputs),
  summed over layers;
- query head / KV group: the L2 norm of the attention output of the head (of the group's heads) before ``o_proj``;
- FFN channel: ``|x|`` of the input of ``down_proj`` (``act(gate) * up``);
- layer: block influence ``1 - cos(layer input, layer output)``, averaged over tokens;
- expert (mixture-of-experts layers): the routing weight it is given times the L2 norm of its output, summed over
  the tokens routed to it and divided by all tokens (an expert never routed to scores 0); its FFN channels: ``|x|`` of
  its ``down_proj`` input over the tokens routed to it. The share of tokens routed to each is recorded too.

Scores come from the HF model; a plan made from them applies to the Megatron checkpoint of the same model too.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from megatron.prune.core.select import Scores
from megatron.prune.core.shape import ModelShape
from megatron.prune.errors import PruneError

# Where the statistics are read, as HF module paths inside ``model.model.layers[i]`` (LLaMA, Mistral, Qwen2, Qwen3).
ATTN_NORM = "input_layernorm"  # output [b, s, h]: feeds q/k/v


MLP_NORM = "post_attention_layernorm"  # output [b, s, h]: feeds gate/up


ATTN_OUT = "self_attn.o_proj"  # input [b, s, np*hn]: attention output per head


FFN_ACT = "mlp.down_proj"  # input [b, s, f]: act(gate) * up


EXPERTS = "mlp.experts"  # MoE layers: called with (x [t, h], top-k expert ids [t, k], their weights [t, k])

# the calibration pass: windows, their length, windows per forward
DEFAULT_SAMPLES = 64
DEFAULT_SEQ_LEN = 256
DEFAULT_BATCH_SIZE = 8


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


# measured: lower pruned perplexity than Minitron's mean-l2 on both width shapes (bench/quality.py)
DEFAULT_AGGREGATION = "rms"


def aggregator(name: str) -> Aggregator:
    if name not in AGGREGATIONS:
        raise PruneError(f"unknown aggregation {name!r}; choose one of {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[name]()


def head_norms(attn_out: torch.Tensor, num_units: int) -> torch.Tensor:
    """L2 norm per unit of ``[b, s, units*width]`` -> ``[b, s, units]`` (heads: width hn; groups: hpg*hn)."""
    b, s, _ = attn_out.shape
    return attn_out.float().reshape(b, s, num_units, -1).pow(2).sum(-1).sqrt()


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """``1 - cos(input, output)`` per token ``[b, s, 1]``: 0 for a layer that leaves its input unchanged."""
    cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
    return (1.0 - cos).unsqueeze(-1)


@dataclass
class LayerStats:
    """The aggregators of one decoder layer."""

    attn_norm: Aggregator
    mlp_norm: Aggregator
    heads: Aggregator
    groups: Aggregator
    ffn: Aggregator
    influence: Aggregator  # always a plain mean over tokens
    experts: "ExpertStats | None" = None  # mixture-of-experts layers


class ExpertStats:
    """Per-expert statistics of one MoE layer, from the calls of its experts module (transformers 5's fused experts:
    ``gate_up_proj`` ``[E, 2F, h]`` (gate rows first), ``down_proj`` ``[E, h, F]``)."""

    def __init__(self, num_experts: int, agg: str) -> None:
        self.weighted_norm = torch.zeros(num_experts, dtype=torch.float64)  # sum over routed tokens of w * |y|
        self.routed = torch.zeros(num_experts, dtype=torch.float64)  # tokens routed to each expert
        self.tokens = 0
        self.channels = [aggregator(agg) for _ in range(num_experts)]
        self.width = 0

    def add(self, experts: torch.nn.Module, x: torch.Tensor, top_index: torch.Tensor, top_weight: torch.Tensor) -> None:
        self.tokens += x.shape[0]
        self.width = experts.down_proj.shape[-1]
        for e in range(len(self.channels)):
            token, slot = torch.where(top_index == e)
            if token.numel() == 0:
                continue
            gate, up = torch.nn.functional.linear(x[token], experts.gate_up_proj[e]).chunk(2, dim=-1)
            act = experts.act_fn(gate) * up  # [t_e, F]: the input of this expert's down_proj
            y = torch.nn.functional.linear(act, experts.down_proj[e])
            self.weighted_norm[e] += (top_weight[token, slot].double() * y.double().norm(dim=-1)).sum().cpu()
            self.routed[e] += token.numel()
            self.channels[e].add(act.abs()[None])  # the tokens routed to it, as one sequence

    def importance(self) -> torch.Tensor:
        return (self.weighted_norm / max(self.tokens, 1)).float()

    def frequency(self) -> torch.Tensor:
        return (self.routed / max(self.tokens, 1)).float()

    def channel_scores(self) -> torch.Tensor:
        """``[E, F]``; zeros for an expert no token was routed to."""
        return torch.stack([a.result().cpu() if a.count else torch.zeros(self.width) for a in self.channels])


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
    stats = [LayerStats(*(aggregator(agg) for _ in range(5)), Mean(),
                        ExpertStats(shape.num_experts, agg) if shape.is_moe else None) for _ in layers]
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

    def experts_hook(acc: ExpertStats):
        return lambda mod, args: acc.add(mod, *(a.detach() for a in args[:3]))

    for layer, st in zip(layers, stats):
        sub = dict(layer.named_modules())
        handles += [
            sub[ATTN_NORM].register_forward_hook(output_hook(st.attn_norm, torch.abs)),
            sub[MLP_NORM].register_forward_hook(output_hook(st.mlp_norm, torch.abs)),
            sub[ATTN_OUT].register_forward_pre_hook(input_hook(st.heads,
                                                               lambda x: head_norms(x, shape.num_attention_heads))),
            sub[ATTN_OUT].register_forward_pre_hook(input_hook(st.groups,
                                                               lambda x: head_norms(x, shape.num_query_groups))),
            layer.register_forward_hook(layer_hook(st.influence), with_kwargs=True),
        ]
        if st.experts is not None:
            handles.append(sub[EXPERTS].register_forward_pre_hook(experts_hook(st.experts)))
        else:
            handles.append(sub[FFN_ACT].register_forward_pre_hook(input_hook(st.ffn, torch.abs)))
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
    moe = {}
    if stats[0].experts is not None:  # a MoE model has no dense FFN
        moe = dict(experts=torch.stack([s.experts.importance() for s in stats]),
                   expert_ffn=torch.stack([s.experts.channel_scores() for s in stats]),
                   routing=torch.stack([s.experts.frequency() for s in stats]))
    ffn = [torch.zeros(0) if s.experts is not None else s.ffn.result().cpu() for s in stats]
    return Scores(
        hidden=hidden.cpu(),
        heads=torch.stack([s.heads.result() for s in stats]).cpu(),
        ffn=torch.stack(ffn),
        groups=torch.stack([s.groups.result() for s in stats]).cpu(),
        layers=torch.cat([s.influence.result() for s in stats]).cpu(),
        method="activation",
        **moe,
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
