"""Vocabulary pruning of HF models: embedding / output rows sliced through the prune plan, tokenizer and
config renumbered consistently, logits over kept tokens unchanged bit for bit."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from compare import tree_hash
from megatron.prune.core.plan import PrunePlan
from megatron.prune.errors import PruneError
from megatron.prune.vocab import count_tokens, open_tokenizer, prune_hf_vocab, prune_tokenizer
from megatron.prune.vocab.folder import tokenizer_tokens
from tiny import logits
from tiny_corpus import calib_docs, make_bytelevel_tokenizer, model_with_tokenizer, needed_for, write_docs


@pytest.fixture(scope="module")
def bbpe(tmp_path_factory):
    return make_bytelevel_tokenizer(tmp_path_factory.mktemp("bbpe") / "tok")


def n_params(folder: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())


def encode(folder: Path, docs: list[str], length: int) -> torch.Tensor:
    """[len(docs), length] ids: the first ``length`` tokens of each doc (docs shorter than that are skipped)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    rows = [e.ids[:length] for e in tok.encode_batch(docs, add_special_tokens=False) if len(e.ids) >= length]
    return torch.tensor(rows)


@pytest.mark.parametrize("family", ["llama-gqa", "llama-tied", "qwen2-bias", "qwen3"])
def test_hf_vocab_prune_keeps_logits_of_kept_tokens(family, bbpe, tmp_path):
    # pad_token_id names an ordinary, rarely used token: it must survive and be renumbered
    src = model_with_tokenizer(tmp_path / "src", family, bbpe, bos_token_id=1, eos_token_id=2, pad_token_id=2999)
    before = tree_hash(src)
    docs = calib_docs()[::25]
    counts = count_tokens(src, [write_docs(tmp_path / "d.jsonl", docs)], open_tokenizer(src).rules, workers=1,
                          progress=False)
    keep = len(needed_for(src, counts)) + 40
    plan = prune_hf_vocab(src, tmp_path / "out", keep=keep, counts=counts, progress=False)
    out = tmp_path / "out"
    kept = list(plan.vocab)
    assert len(kept) == keep < 3000 and 2999 in kept
    assert tree_hash(src) == before

    ids = encode(src, docs, 48)[:6]
    new_ids = encode(out, docs, 48)[:6]
    remap = torch.full((3000,), -1, dtype=torch.long)
    remap[torch.tensor(kept)] = torch.arange(keep)
    assert torch.equal(new_ids, remap[ids])  # the pruned tokenizer gives the same tokens, renumbered
    full, pruned = logits(src, ids), logits(out, new_ids)
    assert pruned.shape[-1] == keep
    assert torch.equal(full[..., kept], pruned)

    hidden = plan.source.hidden_size
    tied = plan.source.tied_embeddings
    assert n_params(src) - n_params(out) == (3000 - keep) * hidden * (1 if tied else 2)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == keep and cfg["tie_word_embeddings"] == tied
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, kept.index(2999))
    assert PrunePlan.load(out) == plan


def test_hf_vocab_prune_bad_inputs(bbpe, tmp_path, tiny_hf):
    src = model_with_tokenizer(tmp_path / "src", "llama-gqa", bbpe)
    with pytest.raises(PruneError, match="at least 259 tokens"):
        prune_hf_vocab(src, tmp_path / "a", keep=100, progress=False)
    with pytest.raises(PruneError, match=r"token id 4000 is out of range \[0, 3000\)"):
        prune_hf_vocab(src, tmp_path / "b", keep_ids=[3, 4000], progress=False)
    small = model_with_tokenizer(tmp_path / "small", "llama-gqa", bbpe, vocab_size=2000)
    with pytest.raises(PruneError, match="tokenizer has 3000 tokens but the model only 2000"):
        prune_hf_vocab(small, tmp_path / "c", keep=1000, progress=False)
    with pytest.raises(PruneError, match="no supported tokenizer"):
        prune_hf_vocab(tiny_hf("llama-gqa"), tmp_path / "d", keep=50, progress=False)
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_like_keeps_exactly_the_tokens_of_a_pruned_vocabulary(bbpe, tmp_path):
    """--like gives an unpruned model the vocabulary of one pruned from it (the same ids, the same tokenizer
    file) and refuses tokenizers that were not pruned from it, before writing anything."""
    from megatron.prune.cli import main as cli_main

    src = model_with_tokenizer(tmp_path / "src", "llama-gqa", bbpe, bos_token_id=1, eos_token_id=2)
    plan = prune_hf_vocab(src, tmp_path / "small", keep=400, progress=False)
    assert cli_main(["vocab", "prune", "--input", str(src), "--output", str(tmp_path / "like"), "--like",
                     str(tmp_path / "small"), "--no-progress"]) == 0
    assert PrunePlan.load(tmp_path / "like").vocab == plan.vocab
    assert (tmp_path / "like" / "tokenizer.json").read_bytes() == (tmp_path / "small" / "tokenizer.json").read_bytes()

    tokens = tokenizer_tokens(tmp_path / "small")
    shuffled = (*tokens[:300], tokens[301], tokens[300], *tokens[302:])  # same tokens, other numbering
    with pytest.raises(PruneError, match=rf"--like: its token 301 {re.escape(repr(tokens[300]))} does not occur"):
        prune_tokenizer(src, tmp_path / "a", like=shuffled)
    with pytest.raises(PruneError, match=r"--like: it lacks 1 token\(s\) .* \(ids 2 '"):
        prune_tokenizer(src, tmp_path / "b", like=tokens[:2] + tokens[3:])  # eos dropped
    with pytest.raises(PruneError, match="give exactly one of --keep N, --keep-ids FILE and --like TOKENIZER"):
        prune_tokenizer(src, tmp_path / "c", keep=400, like=tokens)
    assert cli_main(["vocab", "prune", "--input", str(src), "--output", str(tmp_path / "d"), "--like",
                     str(tmp_path / "nowhere")]) == 2
    assert cli_main(["vocab", "prune", "--input", str(src), "--output", str(tmp_path / "e"), "--like",
                     str(tmp_path / "like" / "prune_plan.json")]) == 2
    assert not any((tmp_path / n).exists() for n in "abcde")


@pytest.mark.slow
def test_smollm2_vocab_8k(real_model, tmp_path):
    """Real model: logits over kept tokens unchanged, perplexity change explained exactly (and < 1% once the
    dropped tokens carry little mass), (V - N) x hidden fewer parameters."""
    docs = calib_docs()
    counts = count_tokens(real_model, [write_docs(tmp_path / "d.jsonl", docs)], open_tokenizer(real_model).rules,
                          workers=2, progress=False)
    plan = prune_hf_vocab(real_model, tmp_path / "out", keep=8000, counts=counts, progress=False)
    out, kept = tmp_path / "out", list(plan.vocab)
    ids = encode(real_model, docs[3:40], 96)[:4]
    new_ids = encode(out, docs[3:40], 96)[:4]
    remap = torch.full((49152,), -1, dtype=torch.long)
    remap[torch.tensor(kept)] = torch.arange(8000)
    assert torch.equal(new_ids, remap[ids])
    full, pruned = logits(real_model, ids), logits(out, new_ids)
    assert torch.equal(full[..., kept], pruned)

    # Perplexity: the pruned model renormalises over the kept tokens, so for in-domain text (all targets kept)
    # log ppl drops by exactly the mean log of the probability mass the full model puts on kept tokens.
    def log_ppl(lg: torch.Tensor, tgt: torch.Tensor) -> float:
        return torch.nn.functional.cross_entropy(lg[:, :-1].flatten(0, 1), tgt[:, 1:].flatten()).item()

    mass = full[:, :-1].log_softmax(-1)[..., kept].logsumexp(-1)  # log P(kept) per position, <= 0
    l0, l1 = log_ppl(full, ids), log_ppl(pruned, new_ids)
    assert l1 == pytest.approx(l0 + mass.mean().item(), abs=1e-4)
    assert l1 < l0
    # measured: 26.87 -> 25.48 (-5.2%); the mass on the 41k dropped tokens is ~5% per position at N=8000
    assert (math.exp(l0) - math.exp(l1)) / math.exp(l0) < 0.06
    assert plan.source.num_params() - plan.target.num_params() == (49152 - 8000) * 576
    assert n_params(real_model) - n_params(out) == (49152 - 8000) * 576

    # With 32k kept tokens the dropped ones carry < 1% of the mass: perplexity changes by < 1% (measured -0.8%).
    prune_hf_vocab(real_model, tmp_path / "out32", keep=32000, counts=counts, progress=False)
    l32 = log_ppl(logits(tmp_path / "out32", encode(tmp_path / "out32", docs[3:40], 96)[:4]),
                  encode(tmp_path / "out32", docs[3:40], 96)[:4])
    assert abs(math.exp(l32) - math.exp(l0)) / math.exp(l0) < 0.01


@pytest.mark.parametrize("family", ["llama-gqa", "llama-tied", "qwen3"])
def test_megatron_tp2_vocab_prune_equals_hf_path(family, bbpe, tmp_path):
    """HF -> Megatron TP=2 -> vocab prune (shards rewritten, padding recomputed) -> HF equals the HF-path result."""
    from safetensors.torch import load_file

    from megatron.prune.formats.mcore.ops import hf_to_megatron, iter_state_dicts, megatron_to_hf
    from megatron.prune.formats.mcore.schema import META_DIR
    from megatron.prune.vocab import prune_megatron_vocab

    src = model_with_tokenizer(tmp_path / "src", family, bbpe, bos_token_id=1, eos_token_id=2, pad_token_id=2999)
    docs = calib_docs()[::25]
    counts = count_tokens(src, [write_docs(tmp_path / "d.jsonl", docs)], open_tokenizer(src).rules, workers=1,
                          progress=False)
    keep = len(needed_for(src, counts)) + 41  # odd on purpose: the TP=2 padding must be recomputed
    hf_plan = prune_hf_vocab(src, tmp_path / "hf_out", keep=keep, counts=counts, progress=False)
    hf_to_megatron(src, tmp_path / "mg", tp=2, make_vocab_size_divisible_by=64, progress=False)
    mg_plan = prune_megatron_vocab(tmp_path / "mg", tmp_path / "mg_out", keep=keep, counts=counts, progress=False)
    assert mg_plan == hf_plan
    shards = dict(iter_state_dicts(tmp_path / "mg_out"))
    assert sorted(shards) == [(0, 0), (1, 0)]
    padded = -(-keep // 128) * 128  # divisible by 64 x TP 2
    for (tp_rank, _), sd in shards.items():
        assert sd["args"].padded_vocab_size == padded and sd["args"].vocab_size == keep
        emb = sd["model"]["embedding.word_embeddings.weight"]
        assert emb.shape[0] == padded // 2
    # the same vocabulary named by the HF result's tokenizer (`vocab prune --like`) gives the same plan
    like = prune_megatron_vocab(tmp_path / "mg", tmp_path / "mg_like", like=tokenizer_tokens(tmp_path / "hf_out"),
                                progress=False)
    assert like.vocab == hf_plan.vocab
    megatron_to_hf(tmp_path / "mg_out", tmp_path / "back", progress=False)
    a, b = load_file(tmp_path / "hf_out" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (tmp_path / "back" / "tokenizer.json").read_text() == (tmp_path / "hf_out" / "tokenizer.json").read_text()
    cfg = json.loads((tmp_path / "mg_out" / META_DIR / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["pad_token_id"]) == (keep, list(hf_plan.vocab).index(2999))


def test_vocab_prune_of_a_moe_model_hf_and_megatron_ep2(bbpe, tmp_path):
    """`megatron-prune vocab prune` of a tiny Qwen3-MoE, from its HF folder and from its Megatron conversions (TP=2
    EP=2, SequentialMLP and grouped-GEMM experts): the kept embedding / output rows are the original rows, every
    other tensor (router, experts, attention, norms) is untouched bit for bit, and the Megatron results exported to
    HF equal the HF result (tensors and tokenizer); the grouped checkpoint stays grouped."""
    from safetensors.torch import load_file

    from megatron.prune.cli import main
    from megatron.prune.formats.folder import open_megatron
    from megatron.prune.formats.mcore.ops import hf_to_megatron, megatron_to_hf

    src = model_with_tokenizer(tmp_path / "src", "qwen3-moe", bbpe, bos_token_id=1, eos_token_id=2)
    docs = calib_docs()[::25]
    counts = count_tokens(src, [write_docs(tmp_path / "d.jsonl", docs)], open_tokenizer(src).rules, workers=1,
                          progress=False)
    counts.save(tmp_path / "c.json")
    keep = len(needed_for(src, counts)) + 41
    hf_to_megatron(src, tmp_path / "mg", tp=2, ep=2, make_vocab_size_divisible_by=64, progress=False)
    hf_to_megatron(src, tmp_path / "mg-grouped", tp=2, ep=2, spec="transformer_engine", grouped=True,
                   make_vocab_size_divisible_by=64, progress=False)
    for name in ("src", "mg", "mg-grouped"):
        assert main(["vocab", "prune", "--input", str(tmp_path / name), "--output", str(tmp_path / f"{name}-out"),
                     "--keep", str(keep), "--counts", str(tmp_path / "c.json"), "--no-progress"]) == 0
    kept = list(PrunePlan.load(tmp_path / "src-out").vocab)
    assert len(kept) == keep < 3000
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "src-out" / "model.safetensors")
    assert a.keys() == b.keys() and any(".experts.3." in n for n in a)
    for name in a:
        want = a[name][kept] if name in ("model.embed_tokens.weight", "lm_head.weight") else a[name]
        assert torch.equal(want, b[name]), name
    assert open_megatron(tmp_path / "mg-grouped-out").grouped and open_megatron(tmp_path / "mg-out").ep == 2
    for name in ("mg", "mg-grouped"):
        back = megatron_to_hf(tmp_path / f"{name}-out", tmp_path / f"{name}-back", progress=False)
        c = load_file(back / "model.safetensors")
        assert c.keys() == b.keys()
        for t in b:
            assert torch.equal(b[t], c[t]), (name, t)
        assert (back / "tokenizer.json").read_text() == (tmp_path / "src-out" / "tokenizer.json").read_text()
