"""Core attention for megatron-core's local layer spec through ``torch.nn.functional.scaled_dot_product_attention``.

Without Transformer Engine, megatron-core's local spec computes attention unfused: it materialises the
``[b, heads, s, s]`` score matrix and runs softmax over it (half the step time at 2k tokens on an H200).
PyTorch's SDPA runs the same maths in one flash or memory-efficient kernel. Same parameters (none) and the same
outputs up to rounding, so checkpoints move freely between the two. The cases SDPA cannot express here fall back
to the stock module: a given mask (``--reset-attention-mask``'s per-document masks), sliding windows, softmax
offsets, query-key layer scaling. Which runs use it: :func:`uses_sdpa`.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

# --attention-backend values: megatron-core's unfused attention, or SDPA asked for by name.
UNFUSED_BACKENDS: frozenset[str] = frozenset({"unfused"})
FUSED_BACKENDS: frozenset[str] = frozenset({"flash", "fused"})


def uses_sdpa(args: Any) -> bool:
    """Whether the local spec's core attention is :class:`SDPAttention`: with ``--attention-backend flash|fused``;
    by default (``auto``) on a GPU unless ``--deterministic-mode``. CPU runs keep the stock module by default: with
    SDPA a PP=2 run's loss after one step differed from the PP=1 run's in the last printed digit, where the stock
    module gives the same bits (which CPU tests and users comparing layouts rely on); speed matters on GPUs."""
    backend = getattr(args, "attention_backend", None)
    backend = getattr(backend, "name", backend)
    if backend in UNFUSED_BACKENDS or backend in FUSED_BACKENDS:
        return backend in FUSED_BACKENDS
    return on_gpu() and not getattr(args, "deterministic_mode", False)


def on_gpu() -> bool:
    """A real GPU run (not CPU behind the shims, which make ``torch.cuda`` look present)."""
    from ..cpu import shims_active

    return torch.cuda.is_available() and not shims_active()


class SDPAttention(DotProductAttention):
    """``DotProductAttention`` whose plain causal (or unmasked) case runs as one SDPA kernel."""

    def _sdpa_can_run(self, attention_mask: torch.Tensor | None, mask_type: AttnMaskType, sq: int, sk: int) -> bool:
        """SDPA computes exactly what the stock module would: no explicit mask, no window, no extras."""
        return (attention_mask is None and self.softmax_offset is None
                and self.scale_mask_softmax.window_size is None
                and not self.config.apply_query_key_layer_scaling
                and (mask_type == AttnMaskType.no_mask or (mask_type == AttnMaskType.causal and sq == sk)))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params: Any = None) -> torch.Tensor:
        """``query`` ``[sq, b, np, hn]``, ``key``/``value`` ``[sk, b, ng, hn]`` → context ``[sq, b, np * hn]``."""
        mask_type = self.attn_mask_type  # as the stock module: the built type (a per-call one only in inference)
        if attention_bias is not None or packed_seq_params is not None or attn_mask_type not in (None, mask_type) \
                or not self._sdpa_can_run(attention_mask, mask_type, query.size(0), key.size(0)):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        repeat = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        dropout = self.attention_dropout.p if self.training else 0.0

        def attend() -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=mask_type == AttnMaskType.causal, scale=self.softmax_scale)

        if dropout > 0.0 and not self.config.sequence_parallel:  # the stock module's RNG stream for attention
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        sq, b = query.size(0), query.size(1)
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
