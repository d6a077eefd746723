"""Perplexity on non-overlapping windows of text, and a short greedy generation, of a loaded HF model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from megatron.prune.errors import PruneError


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
