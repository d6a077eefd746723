"""Perplexity on non-overlapping windows, and a short greedy generation, for HF checkpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .shape import PruneError


def load_hf(folder: Path | str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Stock ``AutoModelForCausalLM`` / ``AutoTokenizer`` from a local folder (no hub access): an HF checkpoint,
    or a Megatron checkpoint built into the same HF model in memory (see :func:`megatron_as_hf`)."""
    from transformers import AutoModelForCausalLM

    from .megatron_ckpt import is_megatron_dir

    folder = Path(folder)
    if is_megatron_dir(folder):
        return megatron_as_hf(folder, dtype, device)
    check_model_folder(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True).to(device).eval()
    return model, load_tokenizer(folder)


def check_model_folder(folder: Path) -> None:
    """``folder`` holds a model to run: HF config and weights, or a Megatron checkpoint with an hf_meta/ tokenizer."""
    from .megatron_ckpt import is_megatron_dir

    if is_megatron_dir(folder):
        check_megatron_tokenizer(folder)
        return
    if not (folder / "config.json").is_file():
        raise PruneError(f"{folder} is not an HF model folder (no config.json) nor a Megatron checkpoint (no "
                         f"latest_checkpointed_iteration.txt)")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        raise PruneError(f"{folder}: no weights (*.safetensors or pytorch_model*.bin) beside its config.json")


def load_tokenizer(folder: Path | str):
    """The tokenizer of a model folder: its own (HF), or the one in a Megatron checkpoint's ``hf_meta/``."""
    from transformers import AutoTokenizer

    from .megatron_ckpt import META_DIR, is_megatron_dir

    folder = Path(folder)
    return AutoTokenizer.from_pretrained(folder / META_DIR if is_megatron_dir(folder) else folder,
                                         local_files_only=True)


def has_tokenizer(folder: Path) -> bool:
    """``folder`` holds a tokenizer transformers can load (fast ``tokenizer.json`` or a tokenizer config)."""
    return any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))


def megatron_as_hf(folder: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The HF model of a Megatron checkpoint (latest iteration; torch or torch_dist; any TP/PP), built in memory
    tensor by tensor, with the tokenizer of its ``hf_meta/``: score and evaluate it without exporting it first.

    Same config, weights and class as ``convert megatron-to-hf`` would write, so the logits are the same.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from .hf import parse_hf_name
    from .megatron_ckpt import PARAM_OF_ROLE, PARAMS, MegatronCheckpoint

    src = MegatronCheckpoint.open(folder)
    check_megatron_tokenizer(folder)
    config = megatron_hf_config(src)
    with no_init_weights(), torch.device(device):  # parameters are overwritten below: skip the random init
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = dict(model.named_parameters())  # tied embeddings appear once, as the embedding
    stored = [p.key for p in PARAMS]

    def read_order(name: str) -> tuple[int, int, str]:  # stored tensor, then layer: each is read (unfused) once
        role, layer = parse_hf_name(name)
        return stored.index(PARAM_OF_ROLE[role].key), layer or 0, role

    order = sorted(params, key=read_order)
    with torch.no_grad():
        for name in tqdm(order, desc="loading tensors", unit="tensor", disable=len(order) < 64):
            params[name].copy_(src.get(*parse_hf_name(name)))
    src.release()
    return model.eval(), load_tokenizer(folder)


def check_megatron_tokenizer(folder: Path) -> None:
    """A Megatron checkpoint runs as an HF model only with the tokenizer our conversion keeps in ``hf_meta/``."""
    from .megatron_ckpt import META_DIR

    if not has_tokenizer(folder / META_DIR):
        raise PruneError(f"{folder} has no tokenizer in {META_DIR}/ (a checkpoint converted elsewhere): export it "
                         f"with `megatron-prune convert megatron-to-hf --input {folder} --output {folder}-hf` and "
                         f"copy the model's tokenizer files into {folder}-hf")


def megatron_hf_config(src):
    """The transformers config of the HF model a Megatron checkpoint converts to (refused where transformers
    cannot build that shape)."""
    from transformers import AutoConfig

    from .hf import check_hf_target
    from .shape import hf_config_for_shape

    check_hf_target(src.shape)
    cfg = hf_config_for_shape(src.hf_config, src.shape)
    return AutoConfig.for_model(cfg.pop("model_type", "llama"), **cfg)


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int  # predicted tokens
    windows: int

    @classmethod
    def of(cls, total_nll: float, tokens: int, windows: int) -> "Perplexity":
        mean = total_nll / tokens
        return cls(math.exp(mean), mean, tokens, windows)


def tokenize(tok, text: str, max_tokens: int | None) -> torch.Tensor:
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return ids[:max_tokens] if max_tokens else ids


def eval_windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows ``[n, seq_len]`` of ``ids``; a short tail is dropped."""
    if seq_len < 2:
        raise PruneError(f"--seq-len {seq_len}: must be at least 2")
    n = ids.numel() // seq_len
    if n == 0:
        raise PruneError(f"text has {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def batch_nll(logits: torch.Tensor, batch: torch.Tensor) -> float:
    """Summed NLL of each next token of ``batch`` ``[b, s]`` under ``logits`` ``[b, s, v]`` (float32)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
    ).item()


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int = 512, batch_size: int = 4, progress: bool = True) -> Perplexity:
    """exp(mean NLL) over non-overlapping windows of ``seq_len`` tokens; a short tail window is dropped."""
    windows = eval_windows(ids, seq_len)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        total += batch_nll(model(input_ids=batch).logits.float(), batch)
        count += batch[:, 1:].numel()
    return Perplexity.of(total, count, windows.shape[0])


@torch.no_grad()
def greedy(model, tok, prompt: str, max_new_tokens: int = 24) -> str:
    """A short greedy continuation, to eyeball what pruning did to the model."""
    ids = tok(prompt, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
