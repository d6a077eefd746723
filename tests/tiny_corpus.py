"""Tiny tokenizers and corpora built from the stdlib's pydoc text, for data and training tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def pydoc_documents(n: int = 60, max_chars: int = 2000) -> list[str]:
    """``n`` real English documents (pydoc topics), deterministic order."""
    from pydoc_data.topics import topics

    return [topics[k][:max_chars] for k in sorted(topics)[:n]]


def make_hf_tokenizer(folder: Path, vocab_size: int = 300) -> Path:
    """Train a byte-level BPE on pydoc text and save it as an HF tokenizer folder with EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(pydoc_documents(200), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return folder


def make_spm_tokenizer(folder: Path, vocab_size: int = 200) -> Path:
    """Train a tiny SentencePiece model on pydoc text; returns the .model path."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(d.replace("\n", " ") for d in pydoc_documents(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "spm"),
                                   vocab_size=vocab_size, model_type="bpe", minloglevel=2)
    return folder / "spm.model"


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def write_ids(prefix, documents: list[np.ndarray], dtype=np.uint16) -> str:
    """An indexed dataset holding exactly these token ids (megatron-core's own builder)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in documents:
        builder.add_document(doc.astype(dtype), [doc.size])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


# ---- byte-level BPE tokenizers and models carrying them (vocabulary tests) ----

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def calib_docs() -> list[str]:
    """The built-in calibration text's paragraphs."""
    from megatron.prune.text import builtin_text

    return [d for d in builtin_text("calib").split("\n\n") if d.strip()]


def make_bytelevel_tokenizer(folder: Path, vocab: int = 3000) -> Path:
    """A GPT-2 style byte-level BPE trained on the built-in text, with chat specials, saved as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron.prune.text import builtin_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(builtin_text("calib").split("\n"), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "TokenizersBackend", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
           "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
           "added_tokens_decoder": {str(i): {"content": s, "special": True} for i, s in enumerate(SPECIALS)}}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def write_docs(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def needed_for(folder: Path, counts) -> set[int]:
    """Every id the counted text used, the always-kept set, and what they all need."""
    from megatron.prune.vocab import closure, open_tokenizer

    rules = open_tokenizer(folder).rules
    return closure([i for i, c in enumerate(counts.counts) if c] + list(rules.required), rules)


def model_with_tokenizer(folder: Path, family: str, tok_dir: Path, **overrides) -> Path:
    """A tiny random HF model of ``family`` carrying the tokenizer of ``tok_dir`` (vocabulary sized to it)."""
    import shutil

    from megatron.prune.vocab import open_tokenizer
    from tiny import make_tiny_hf

    overrides.setdefault("vocab_size", open_tokenizer(tok_dir).rules.size)
    make_tiny_hf(folder, family, **overrides)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tok_dir / name).is_file():
            shutil.copy(tok_dir / name, folder / name)
    return folder
