"""Text → Megatron indexed dataset (``PREFIX_text_document.bin/.idx``) with the model's own tokenizer.

Input is jsonl (one document per line, in its ``text`` field) or plain text (documents separated by
blank lines). Each document is encoded without special tokens and followed by the tokenizer's EOD
(its EOS token), the layout megatron-core's ``GPTDataset`` expects. Writing goes through
megatron-core's ``IndexedDatasetBuilder`` into temp files renamed into place at the end.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .shape import PruneError

SUFFIX = "_text_document"  # Megatron's naming for a dataset built from the "text" key


@dataclass(frozen=True)
class TokenizerInfo:
    """What the dataset needs to know about a tokenizer."""

    path: str
    kind: str  # "hf" (a tokenizer folder) | "sentencepiece" (a .model file)
    vocab_size: int
    eod_id: int


class TextTokenizer:
    """Encode text with an HF tokenizer folder or a SentencePiece ``.model``, no special tokens."""

    def __init__(self, path: str | os.PathLike) -> None:
        p = Path(path)
        if p.is_file() and p.suffix == ".model":
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(p))
            self._hf = None
            eod, vocab, kind = self._sp.eos_id(), self._sp.get_piece_size(), "sentencepiece"
        elif p.is_dir():
            from transformers import AutoTokenizer

            try:
                self._hf = AutoTokenizer.from_pretrained(str(p))
            except (OSError, ValueError) as e:
                raise PruneError(f"--tokenizer {p}: not a loadable HF tokenizer folder ({e})") from e
            self._sp = None
            eod, vocab, kind = self._hf.eos_token_id, len(self._hf), "hf"
        else:
            raise PruneError(
                f"--tokenizer {p}: expected an HF tokenizer folder or a SentencePiece .model file"
            )
        if eod is None or eod < 0:
            raise PruneError(f"--tokenizer {p}: the tokenizer has no EOS token to use as EOD")
        self.info = TokenizerInfo(str(p), kind, int(vocab), int(eod))

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return list(self._sp.encode(text))
        return list(self._hf(text, add_special_tokens=False)["input_ids"])

    def encode_document(self, text: str) -> list[int]:
        """Token ids of one document followed by EOD."""
        return self.encode(text) + [self.info.eod_id]


def read_documents(path: str | os.PathLike) -> Iterator[str]:
    """Documents of a ``.jsonl`` (``text`` field) or plain-text file (blank-line separated)."""
    p = Path(path)
    if not p.is_file():
        raise PruneError(f"--input {p}: no such file")
    if p.suffix in (".jsonl", ".json"):
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise PruneError(f"--input {p}:{n}: not a JSON object with a 'text' field") from e
                if not isinstance(doc, str):
                    raise PruneError(f"--input {p}:{n}: 'text' is {type(doc).__name__}, not a string")
                yield doc
        return
    with open(p, encoding="utf-8") as f:
        yield from split_paragraphs(f)


def split_paragraphs(lines: Sequence[str] | Iterator[str]) -> Iterator[str]:
    """Group lines into blank-line separated documents (stripped of trailing whitespace)."""
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line.rstrip("\n"))
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def dataset_paths(output_prefix: str | os.PathLike) -> tuple[Path, Path]:
    """The ``.bin`` and ``.idx`` paths written for an output prefix."""
    base = f"{output_prefix}{SUFFIX}"
    return Path(base + ".bin"), Path(base + ".idx")


def validate_dataset_prefix(prefix: str) -> None:
    """Fail early, naming the files, when a data prefix has no ``.bin``/``.idx`` pair."""
    missing = [f"{prefix}{ext}" for ext in (".bin", ".idx") if not os.path.isfile(f"{prefix}{ext}")]
    if missing:
        hint = "" if prefix.endswith(SUFFIX) else f" (did you mean {prefix}{SUFFIX}?)"
        raise PruneError(f"data prefix {prefix}: missing {', '.join(missing)}{hint}")


# Bytes of token ids read per dataset to check them: all of a small file, else evenly spread blocks.
CHECK_BYTES, CHECK_BLOCKS = 16 << 20, 16


def token_dtype(prefix: str) -> np.dtype:
    """The token dtype recorded in ``PREFIX.idx`` (megatron-core's index header)."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    with open(f"{prefix}.idx", "rb") as f:
        head = f.read(len(_INDEX_HEADER) + 9)
    if not head.startswith(_INDEX_HEADER) or len(head) < len(_INDEX_HEADER) + 9:
        raise PruneError(f"data prefix {prefix}: {prefix}.idx is not a Megatron indexed-dataset index")
    return np.dtype(DType.dtype_from_code(head[len(_INDEX_HEADER) + 8]))


def max_token_id(prefix: str, budget: int = CHECK_BYTES, blocks: int = CHECK_BLOCKS) -> tuple[int, bool]:
    """Largest token id in ``PREFIX.bin`` and whether that is exact: every id of a file up to ``budget`` bytes,
    else the ids of ``blocks`` evenly spread blocks (one tokenizer's ids against another's differ everywhere)."""
    ids = np.memmap(f"{prefix}.bin", dtype=token_dtype(prefix), mode="r")
    if ids.size == 0:
        return -1, True
    if ids.nbytes <= budget:
        return int(ids.max()), True
    block = max(1, budget // blocks // ids.itemsize)
    starts = np.linspace(0, ids.size - block, blocks).astype(np.int64)
    return max(int(ids[s:s + block].max()) for s in starts), False


def check_token_ids(prefix: str, vocab_size: int, budget: int = CHECK_BYTES, blocks: int = CHECK_BLOCKS) -> None:
    """Refuse a dataset holding ids the model's tokenizer does not have. Out-of-range ids crash at TP=1, but at
    TP>1 the vocab-parallel embedding and loss mask them to zero, so training would go on, silently wrong."""
    top, exact = max_token_id(prefix, budget, blocks)
    if top >= vocab_size:
        where = "" if exact else " (in a sample of the file)"
        raise PruneError(f"data prefix {prefix}: token id {top}{where} is outside the tokenizer's vocabulary of "
                         f"{vocab_size}: it was tokenized with another tokenizer; run `megatron-prune data` again "
                         f"with this model's tokenizer")


_WORKER_TOKENIZER: TextTokenizer | None = None


def _init_worker(path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = TextTokenizer(path)


def _encode_in_worker(text: str) -> list[int]:
    assert _WORKER_TOKENIZER is not None
    return _WORKER_TOKENIZER.encode_document(text)


@dataclass(frozen=True)
class PreprocessSummary:
    documents: int
    tokens: int
    bin_path: Path
    idx_path: Path


def preprocess(
    input_path: str | os.PathLike,
    output_prefix: str | os.PathLike,
    tokenizer: str | os.PathLike,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> PreprocessSummary:
    """Tokenize every document (+EOD) into ``PREFIX_text_document.bin/.idx``; return counts."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    if workers < 1:
        raise PruneError(f"--workers {workers}: must be at least 1")
    bin_path, idx_path = dataset_paths(output_prefix)
    existing = [str(p) for p in (bin_path, idx_path) if p.exists()]
    if existing and not overwrite:
        raise PruneError(f"output exists: {', '.join(existing)} (pass --overwrite to replace it)")
    if not bin_path.parent.is_dir():
        raise PruneError(f"--output-prefix {output_prefix}: folder {bin_path.parent} does not exist")
    tok = TextTokenizer(tokenizer)  # validates the tokenizer before any output
    docs = read_documents(input_path)
    first = next(docs, None)  # surfaces a bad input file before any output
    if first is None:
        raise PruneError(f"--input {input_path}: no documents")

    def all_docs() -> Iterator[str]:
        yield first
        yield from docs

    tmp_bin = bin_path.with_name(f".{bin_path.name}.tmp{os.getpid()}")
    tmp_idx = idx_path.with_name(f".{idx_path.name}.tmp{os.getpid()}")
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=DType.optimal_dtype(tok.info.vocab_size))
    n_docs = n_tokens = 0
    pool = mp.get_context("spawn").Pool(workers, _init_worker, (tok.info.path,)) if workers > 1 else None
    try:
        encoded = (pool.imap(_encode_in_worker, all_docs(), chunksize=16) if pool
                   else map(tok.encode_document, all_docs()))
        for ids in tqdm(encoded, desc="tokenize", unit="doc", disable=not progress):
            builder.add_document(np.asarray(ids, dtype=np.int64), [len(ids)])
            n_docs += 1
            n_tokens += len(ids)
        builder.finalize(str(tmp_idx))
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        for t in (tmp_bin, tmp_idx):
            t.unlink(missing_ok=True)
    return PreprocessSummary(n_docs, n_tokens, bin_path, idx_path)
