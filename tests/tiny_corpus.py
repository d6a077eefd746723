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

