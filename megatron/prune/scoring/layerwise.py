"""Activation scoring and perplexity one decoder layer at a time, for models that do not fit in memory.

The model is an HF skeleton on the ``meta`` device (no memory). The embedding runs first, over every calibration
batch, and the inputs of the first decoder layer are kept. Then each layer in turn is materialised from the
checkpoint (HF or Megatron, read tensor by tensor), run over all kept inputs (its outputs replace them), and freed.
Peak memory is one layer plus the calibration activations (a 70B layer is 3.4 GB in float32, the model 280 GB).
Each layer sees the same batches, in the same order, as in a whole-model pass; the scores are the same bits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megatron.prune.core.select import Scores
from megatron.prune.core.shape import ModelShape
from megatron.prune.errors import PruneError
from megatron.prune.formats.folder import as_model_folder
from megatron.prune.formats.source import TensorSource

MODES = ("auto", "always", "never")
# auto: layer by layer once the whole model would take more than this share of the free memory of the device
AUTO_SHARE = 0.5


class _Caught(Exception):
    """Raised by the first layer's hook to stop a forward pass once that layer's inputs are known."""


def open_source(folder: Path) -> tuple[TensorSource, Any]:
    """The checkpoint to read tensors from (``get(role, layer)``) and the transformers config of its HF model."""
    from megatron.prune.runtime import transformers_config

    src = as_model_folder(folder).open()
    return src, transformers_config(src)


def skeleton(config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """The HF model of ``config`` with every parameter on the ``meta`` device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def materialise(module: torch.nn.Module, prefix: str, src: TensorSource, device: str) -> None:
    """Give ``module`` (named ``prefix`` in the HF model) real storage on ``device`` and the checkpoint's values."""
    from megatron.prune.formats.hf import memory_tensor

    module.to_empty(device=device)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(memory_tensor(src, f"{prefix}.{name}"))


def release(module: torch.nn.Module) -> None:
    """Hand ``module``'s storage back (its parameters move to ``meta``)."""
    module.to("meta")


def first_layer_inputs(model: torch.nn.Module, windows: torch.Tensor, batch_size: int,
                       device: str) -> list[tuple[tuple, dict]]:
    """Run the model's own forward up to its first decoder layer for each batch: that layer's (args, kwargs) per
    batch (hidden states, causal mask, rotary embeddings, as the model computes them)."""
    body, layers = model.model, model.model.layers

    def catch(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        raise _Caught(args, kwargs)

    inputs = []
    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                body(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
            except _Caught as caught:
                inputs.append(caught.args)
            else:
                raise PruneError(f"{type(model).__name__}: the forward pass never reached its first decoder layer")
    finally:
        handle.remove()
    return inputs


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same layer call with other hidden states."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states of a layer call."""
    return args[0] if args else kwargs["hidden_states"]


def prepare(folder: Path, windows: torch.Tensor, batch_size: int, dtype: torch.dtype,
            device: str) -> tuple[TensorSource, torch.nn.Module, list[tuple[tuple, dict]]]:
    """The checkpoint, the model skeleton and the first decoder layer's inputs for every batch of ``windows``."""
    src, config = open_source(folder)
    model = skeleton(config, dtype)
    body = model.model
    materialise(body.embed_tokens, "model.embed_tokens", src, device)
    with torch.device("cpu"):  # its buffers are computed, not stored: as when the whole model is loaded
        body.rotary_emb = type(body.rotary_emb)(config=model.config).to(device)
    inputs = first_layer_inputs(model, windows, batch_size, device)
    release(body.embed_tokens)
    return src, model, inputs


def run_decoder_layers(model: torch.nn.Module, src: TensorSource, inputs: list[tuple[tuple, dict]], device: str,
                       desc: str, progress: bool) -> None:
    """Each decoder layer in turn: materialised, run over every batch (outputs replace inputs), freed."""
    for i, layer in enumerate(tqdm(model.model.layers, desc=desc, unit="layer", disable=not progress)):
        materialise(layer, f"model.layers.{i}", src, device)
        for j, (args, kwargs) in enumerate(inputs):
            out = layer(*args, **kwargs)
            inputs[j] = with_hidden(args, kwargs, out[0] if isinstance(out, tuple) else out)
        release(layer)


@torch.no_grad()
def collect_scores_layerwise(folder: Path, shape: ModelShape, windows: torch.Tensor, batch_size: int,
                             dtype: torch.dtype, device: str, agg: str, progress: bool = True) -> Scores:
    """:func:`.stats.collect_scores` of the model in ``folder``, holding one decoder layer at a time."""
    from megatron.prune.scoring.stats import importance_hooks, scores_from_stats

    src, model, inputs = prepare(folder, windows, batch_size, dtype, device)
    with importance_hooks(model, shape, agg) as stats:
        run_decoder_layers(model, src, inputs, device, "scoring layer by layer", progress)
    src.release()
    return scores_from_stats(stats, agg)


@torch.no_grad()
def perplexity_layerwise(folder: Path, ids: torch.Tensor, seq_len: int, batch_size: int, dtype: torch.dtype,
                         device: str, progress: bool = True):
    """:func:`megatron.prune.perplexity.perplexity` of the model in ``folder``, holding one decoder layer (then the
    head) at a time."""
    from megatron.prune.perplexity import Perplexity, batch_nll, eval_windows

    windows = eval_windows(ids, seq_len)
    src, model, inputs = prepare(folder, windows, batch_size, dtype, device)
    run_decoder_layers(model, src, inputs, device, "perplexity layer by layer", progress)
    materialise(model.model.norm, "model.norm", src, device)
    materialise(model.lm_head, "lm_head", src, device)  # the checkpoints give the embedding where it is tied
    total, count = 0.0, 0
    for start, (args, kwargs) in zip(range(0, windows.shape[0], batch_size), inputs):
        logits = model.lm_head(model.model.norm(hidden_of(args, kwargs))).float()
        batch = windows[start : start + batch_size].to(device)
        total += batch_nll(logits, batch)
        count += batch[:, 1:].numel()
    src.release()
    return Perplexity.of(total, count, windows.shape[0])


def source_shape(folder: Path) -> ModelShape:
    """The shape of the HF or Megatron checkpoint in ``folder`` (read from its config or args, no tensors)."""
    return as_model_folder(folder).open().shape


def free_bytes(device: str) -> int:
    """Memory free for the scoring pass on ``device``: the GPU's free memory, or the host's available memory."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def use_layerwise(mode: str, shape: ModelShape, dtype: torch.dtype, device: str,
                  what: str = "scoring") -> tuple[bool, str]:
    """Whether to run ``what`` layer by layer (``--layer-by-layer``), with the reason when ``auto`` chose it."""
    if mode not in MODES:
        raise PruneError(f"--layer-by-layer {mode!r}; choose one of {', '.join(MODES)}")
    if mode != "auto":
        return mode == "always", ""
    need, free = shape.num_params() * dtype.itemsize, free_bytes(device)
    if need <= AUTO_SHARE * free:
        return False, ""
    return True, (f"{what} layer by layer: the whole model ({need / 2**30:.1f} GiB in {str(dtype)[6:]}) would take "
                  f"more than {AUTO_SHARE:.0%} of the {free / 2**30:.1f} GiB free on {device}")
