"""The recovery run's checks of its parallel layout, before the stock loop starts: the modes this recipe cannot run,
a tensor-parallel size that does not split the model's sizes (Megatron finds both out inside every rank), and a
pipeline size that does not split its layers (Megatron asserts it without the numbers)."""

from __future__ import annotations

import argparse
from typing import Any

from megatron.prune.errors import PruneError
from megatron.prune.training.model import layer_spec_name


def check_parallelism(args: Any) -> None:
    """Parallel modes this recipe cannot run, refused before start-up. Context parallelism would need each rank's
    share of every sequence (get_batch hands every rank whole sequences); sequence parallelism needs TE's RMSNorm
    (megatron-core's local spec uses torch's, which asserts it away only once the model is built)."""
    cp = getattr(args, "context_parallel_size", 1) or 1
    if cp > 1:
        raise PruneError(f"--context-parallel-size {cp}: pretrain_llama.py supports only 1 for now; use tensor or "
                         "pipeline parallelism (--tensor-model-parallel-size, --pipeline-model-parallel-size)")
    if getattr(args, "sequence_parallel", False) and layer_spec_name(args) == "local":
        raise PruneError("--sequence-parallel: this run builds megatron-core's local layer spec, whose RMSNorm does "
                         "not support it; use Transformer Engine (installed, with --transformer-impl "
                         "transformer_engine) or drop --sequence-parallel")


def check_tensor_parallel(args: Any) -> None:
    """The model's query groups (heads without GQA), heads and dense FFN width must split evenly over the TP ranks
    (Megatron finds out inside every rank, in a traceback; a pruned checkpoint's sizes are the user's choice)."""
    tp = getattr(args, "tensor_model_parallel_size", 1) or 1
    heads = getattr(args, "num_attention_heads", None)
    groups = getattr(args, "num_query_groups", None) if getattr(args, "group_query_attention", False) else heads
    sizes = {"query groups": groups, "attention heads": heads}
    if not getattr(args, "num_experts", None):
        sizes["FFN channels"] = getattr(args, "ffn_hidden_size", None)
    sizes = {name: v for name, v in sizes.items() if isinstance(v, int) and v > 0}
    bad = [f"{v} {name}" for name, v in sizes.items() if v % tp]
    if bad:
        valid = [t for t in range(1, min(sizes.values()) + 1) if all(v % t == 0 for v in sizes.values())]
        where = f" of --load {args.load}" if getattr(args, "load", None) else ""
        raise PruneError(f"--tensor-model-parallel-size {tp} (TP): the model{where} has {', '.join(bad)}, not "
                         f"divisible by it; valid TP sizes: {', '.join(map(str, valid))}")


# Megatron's flags for a split of the layers over the pipeline stages other than an even one: with any of them the
# layer count need not divide by PP (Megatron checks those splits itself). The two switches take no value.
UNEVEN_PIPELINE_FLAGS = ("--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers",
                         "--pipeline-model-parallel-layout", "--num-layers-per-virtual-pipeline-stage",
                         "--num-virtual-stages-per-pipeline-rank", "--hybrid-layer-pattern")
UNEVEN_PIPELINE_SWITCHES = ("--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split")


def add_pipeline_flags(p: argparse.ArgumentParser) -> None:
    """The uneven-split flags, for the pre-flight parser: :func:`check_pipeline_parallel` leaves those runs be."""
    for flag in UNEVEN_PIPELINE_FLAGS:
        p.add_argument(flag)
    for flag in UNEVEN_PIPELINE_SWITCHES:
        p.add_argument(flag, action="store_true")


def check_pipeline_parallel(ns: Any, num_layers: Any, where: str) -> None:
    """Refuse a PP size that does not split the layers ``where`` names, with the valid sizes (Megatron names none)."""
    pp = getattr(ns, "pipeline_model_parallel_size", 1)
    try:
        layers = int(num_layers)
    except (TypeError, ValueError):  # none known yet, or a value Megatron's parser refuses itself
        return
    uneven = [f for f in (*UNEVEN_PIPELINE_FLAGS, *UNEVEN_PIPELINE_SWITCHES)
              if getattr(ns, f[2:].replace("-", "_"), None) not in (None, False)]
    if not isinstance(pp, int) or pp <= 1 or layers < 1 or uneven or layers % pp == 0:
        return
    valid = [n for n in range(1, layers + 1) if layers % n == 0]
    raise PruneError(f"--pipeline-model-parallel-size {pp} (PP): the model{where} has {layers} layers, not "
                     f"divisible by it; valid PP sizes: {', '.join(map(str, valid))}")
