"""Text → Megatron indexed dataset (``PREFIX_text_document.bin/.idx``) with the model's own tokenizer.

Input is one file, JSON lines (one document per line, in its ``text`` field or another ``--json-keys`` field)
or plain text (documents separated by blank lines), UTF-8 (a leading BOM is fine), optionally gzipped.
Each document is encoded without special tokens and followed by the tokenizer's EOD (its EOS token), the
layout megatron-core's ``GPTDataset`` expects. Writing goes through megatron-core's ``IndexedDatasetBuilder``
into temp files renamed into place at the end.
"""

from __future__ import annotations

import gzip
import json
import logging
import multiprocessing as mp
import multiprocessing.pool
import os
import re
import signal
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterable, Iterator

import numpy as np

from megatron.prune.errors import PruneError, json_type
from megatron.prune.io.atomic import (FINISHED, check_writable_parent, clean_stale_partials, partial_name,
                                      raise_if_interrupted)
from megatron.prune.io.workers import check_workers, end_with_parent

SUFFIX = "_text_document"  # Megatron's naming for a dataset built from the "text" key

INPUT_FORMATS = ("auto", "jsonl", "text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")  # compared lower-cased, under a ``.gz``
TEXT_SUFFIXES = (".txt", ".text", ".md")

# Megatron-LM's --tokenizer-type names this command can honour -> the kind of path each one needs.
MEGATRON_TOKENIZER_TYPES = {
    "HuggingFaceTokenizer": "hf",
    "SentencePieceTokenizer": "sentencepiece",
    "GPTSentencePieceTokenizer": "sentencepiece",
    "Llama2Tokenizer": "sentencepiece",
}
_KIND_NAMES = {"hf": "an HF tokenizer folder", "sentencepiece": "a SentencePiece .model file"}

# Bytes a UTF-8 decode could not read, as ``errors="surrogateescape"`` leaves them (U+DC80..U+DCFF).
_UNDECODED = re.compile("[\udc80-\udcff]")
def indexed_dataset_module() -> ModuleType:
    """megatron-core's ``indexed_dataset``, imported without its no-CUDA/TE/Apex warnings (only during the import)."""
    cpp_log = logging.getLogger("torch.utils.cpp_extension")  # logs "No CUDA runtime is found" on CPU machines
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets import indexed_dataset
    finally:
        cpp_log.setLevel(level)
    return indexed_dataset


@dataclass(frozen=True)
class TokenizerInfo:
    """What the dataset needs to know about a tokenizer."""

    path: str
    kind: str  # "hf" (a tokenizer folder) | "sentencepiece" (a .model file)
    vocab_size: int
    eod_id: int


def tokenizer_kind(path: str | os.PathLike) -> str | None:
    """``"hf"`` for a folder, ``"sentencepiece"`` for a ``.model`` file, else None (not a tokenizer path)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".model":
        return "sentencepiece"
    return "hf" if p.is_dir() else None


def check_tokenizer_type(tokenizer_type: str | None, path: str | os.PathLike) -> None:
    """Refuse a Megatron-LM ``--tokenizer-type`` that contradicts the tokenizer path (the path decides the kind)."""
    if tokenizer_type is None:
        return
    if tokenizer_type not in MEGATRON_TOKENIZER_TYPES:
        raise PruneError(f"--tokenizer-type {tokenizer_type}: not supported; use one of "
                         f"{', '.join(MEGATRON_TOKENIZER_TYPES)} or leave it out (the path decides)")
    kind, wanted = tokenizer_kind(path), MEGATRON_TOKENIZER_TYPES[tokenizer_type]
    if kind is not None and kind != wanted:
        fitting = next(t for t, k in MEGATRON_TOKENIZER_TYPES.items() if k == kind)
        raise PruneError(f"--tokenizer-type {tokenizer_type} needs {_KIND_NAMES[wanted]}, but --tokenizer {path} is "
                         f"{_KIND_NAMES[kind]}: pass --tokenizer-type {fitting} or leave it out")


class TextTokenizer:
    """Encode text with an HF tokenizer folder or a SentencePiece ``.model``, no special tokens."""

    def __init__(self, path: str | os.PathLike) -> None:
        p = Path(path)
        kind = tokenizer_kind(p)
        if kind == "sentencepiece":
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(p))
            self._hf = None
            eod, vocab = self._sp.eos_id(), self._sp.get_piece_size()
        elif kind == "hf":
            from transformers import AutoTokenizer

            from megatron.prune.formats.folder import has_tokenizer

            if not has_tokenizer(p):  # transformers tries every backend and explains each failure at length
                raise PruneError(f"--tokenizer {p}: no tokenizer.json or tokenizer_config.json in the folder; give "
                                 "the folder of an HF tokenizer (a model folder holds one) or a SentencePiece .model")
            try:
                self._hf = AutoTokenizer.from_pretrained(str(p))
            except (OSError, ValueError) as e:
                raise PruneError(f"--tokenizer {p}: not a loadable HF tokenizer folder ({e})") from e
            self._sp = None
            eod, vocab = self._hf.eos_token_id, len(self._hf)
        elif not p.exists():
            raise PruneError(f"--tokenizer {p}: no such file or folder")
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


def check_input_file(path: str | os.PathLike, flag: str = "--input", several: bool = False) -> None:
    """Refuse a missing input or a folder (``several``: the flag takes several files; else one file per run)."""
    p = Path(path)
    if p.is_dir():
        more = (f"{flag} takes several: pass the files in it" if several else
                "one file per run: concatenate several files into one, or run once per file")
        raise PruneError(f"{flag} {p}: is a folder; pass a file ({more})")
    if not p.exists():
        raise PruneError(f"{flag} {p}: no such file")
    if not p.is_file():  # a device or a pipe (/dev/null, <(cmd)): it can be read, but only once and not sized
        raise PruneError(f"{flag} {p}: not a regular file; save the text to a file and pass that")


def numbered_lines(path: str | os.PathLike, flag: str = "--input") -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 file, gunzipped if it ends in ``.gz``, a leading BOM dropped;
    a byte that is not UTF-8 is an error naming its line and column instead of a decoder traceback."""
    p = Path(path)
    opener = gzip.open if p.suffix.lower() == ".gz" else open
    try:
        with opener(p, "rt", encoding="utf-8-sig", errors="surrogateescape") as f:
            for n, line in enumerate(f, 1):
                bad = _UNDECODED.search(line)
                if bad:
                    raise PruneError(f"{flag} {p}:{n}: not UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x} at column "
                                     f"{bad.start() + 1}); convert the file to UTF-8 (e.g. with iconv)")
                yield n, line
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise PruneError(f"{flag} {p}: not a readable gzip file ({e}); check the file or drop the .gz suffix") from e


def format_suffix(path: str | os.PathLike) -> str:
    """The lower-cased suffix that names a file's format, looking under a ``.gz`` (``a.JSONL.gz`` → ``.jsonl``)."""
    name = Path(path).name.lower()
    return Path(name.removesuffix(".gz")).suffix


def is_json_object(line: str) -> bool:
    """Whether a line parses as one JSON object (how a suffix-less JSON-lines file is recognised)."""
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def resolve_input_format(path: str | os.PathLike, requested: str = "auto", flag: str = "--input") -> str:
    """``"jsonl"`` or ``"text"``: as requested, else by suffix, else sniffed from the first non-blank line."""
    if requested not in INPUT_FORMATS:
        raise PruneError(f"--input-format {requested}: expected one of {', '.join(INPUT_FORMATS)}")
    if requested != "auto":
        return requested
    suffix = format_suffix(path)
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in TEXT_SUFFIXES:
        return "text"
    lines = numbered_lines(path, flag)
    try:
        first = next((line for _, line in lines if line.strip()), "")
    finally:
        lines.close()
    return "jsonl" if is_json_object(first) else "text"


OTHER_FIELD = "pass --json-keys FIELD to read another field"  # the data verb's way; other readers say theirs


def json_document(line: str, key: str, where: str, other_field: str = OTHER_FIELD) -> str:
    """The ``key`` string of one JSON-lines line; an error names ``where`` and, for bad JSON, json's own message;
    ``other_field`` says how to read a file whose text is in another field."""
    try:
        obj = json.loads(line.rstrip("\r\n"))  # a newline inside an unterminated string would hide json's message
    except json.JSONDecodeError as e:
        raise PruneError(f"{where}: not valid JSON ({e.msg}: column {e.colno}); expected one object per line, "
                         f"like {{\"{key}\": \"...\"}}") from e
    if isinstance(obj, list):
        raise PruneError(f"{where}: a JSON array, expected one object per line, like {{\"{key}\": \"...\"}}")
    if not isinstance(obj, dict):
        raise PruneError(f"{where}: a JSON {json_type(obj)}, expected an object with a '{key}' field")
    if key not in obj:
        fields = ", ".join(map(repr, list(obj)[:8])) or "none"
        raise PruneError(f"{where}: not a JSON object with a '{key}' field (fields: {fields}); {other_field}")
    doc = obj[key]
    if not isinstance(doc, str):
        raise PruneError(f"{where}: '{key}' is a JSON {json_type(doc)}, not a string")
    if "\\u" in line:  # only a \u escape can hold an unpaired UTF-16 surrogate, which no tokenizer can encode
        try:
            doc.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PruneError(f"{where}: '{key}' holds an unpaired UTF-16 surrogate ({doc[e.start]!r}, from a "
                             f"\\u{ord(doc[e.start]):04x} escape), which is not text; fix or drop that line") from None
    return doc


def read_documents(path: str | os.PathLike, input_format: str = "auto", key: str = "text") -> Iterator[str]:
    """Documents of a JSON-lines file (the ``key`` field of each line) or of plain text (blank-line separated).
    A JSON document of only whitespace is skipped, as blank lines are in text: it would be an end-of-document token
    alone."""
    check_input_file(path)
    fmt = resolve_input_format(path, input_format)
    lines = numbered_lines(path)
    if fmt == "text":
        yield from split_paragraphs(line for _, line in lines)
        return
    for n, line in lines:
        if line.strip():
            doc = json_document(line, key, f"--input {path}:{n}")
            if doc.strip():
                yield doc


def split_paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Group lines into blank-line separated documents; each line loses only its trailing newline
    (other trailing whitespace is kept, as are the newlines between a document's lines)."""
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line.rstrip("\n"))
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def check_json_key(key: str) -> None:
    """Refuse a ``--json-keys`` field that cannot be part of a file name (it names the output)."""
    if not key or "/" in key or os.sep in key or key in (".", ".."):
        raise PruneError(f"--json-keys {key!r}: the field names the output PREFIX_{key}_document; "
                         f"use a field name without '/'")


def dataset_paths(output_prefix: str | os.PathLike, key: str = "text") -> tuple[Path, Path]:
    """The ``.bin`` and ``.idx`` paths written for an output prefix: ``PREFIX_KEY_document`` as Megatron-LM
    names them (``PREFIX_text_document`` for the default key, see ``SUFFIX``)."""
    base = f"{output_prefix}_{key}_document"
    return Path(base + ".bin"), Path(base + ".idx")


def check_output_prefix(output_prefix: str | os.PathLike) -> None:
    """Refuse a prefix that names a folder (``out/``), which would quietly write ``out/_text_document.*``."""
    prefix = os.fspath(output_prefix)
    separators = tuple(s for s in (os.sep, os.altsep) if s)
    if not prefix or prefix.endswith(separators) or os.path.isdir(prefix):
        example = os.path.join(prefix, "corpus")
        raise PruneError(f"--output-prefix {prefix!r} names a folder, not a file-name prefix; pass e.g. "
                         f"--output-prefix {example} (writes {example}{SUFFIX}.bin/.idx)")


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
    indexed = indexed_dataset_module()
    _INDEX_HEADER, DType = indexed._INDEX_HEADER, indexed.DType

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


def _init_worker(path: str, parent_pid: int) -> None:
    """Load the tokenizer once per worker; Ctrl-C is left to the main process, which terminates the pool, and the
    worker ends with that process however it ends."""
    global _WORKER_TOKENIZER
    end_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_TOKENIZER = TextTokenizer(path)


def _encode_in_worker(text: str) -> list[int]:
    assert _WORKER_TOKENIZER is not None
    return _WORKER_TOKENIZER.encode_document(text)


@contextmanager
def encoder_pool(workers: int, tokenizer_path: str) -> Iterator[multiprocessing.pool.Pool | None]:
    """Tokenizer processes (None for one worker): drained on success, terminated on an error or Ctrl-C
    so that queued documents are not all tokenized before the command can exit."""
    if workers == 1:
        yield None
        return
    pool = mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer_path, os.getpid()))
    try:
        yield pool
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    pool.close()
    pool.join()


@dataclass(frozen=True)
class PreprocessSummary:
    documents: int
    tokens: int
    bin_path: Path
    idx_path: Path
    input_format: str  # "jsonl" | "text": how the input was read


def preprocess(
    input_path: str | os.PathLike,
    output_prefix: str | os.PathLike,
    tokenizer: str | os.PathLike,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    input_format: str = "auto",
    json_key: str = "text",
    tokenizer_type: str | None = None,
) -> PreprocessSummary:
    """Tokenize every document (+EOD) into ``PREFIX_{json_key}_document.bin/.idx``; return counts."""
    from tqdm import tqdm

    check_workers(workers)
    check_output_prefix(output_prefix)
    check_json_key(json_key)
    bin_path, idx_path = dataset_paths(output_prefix, json_key)
    existing = [str(p) for p in (bin_path, idx_path) if p.exists()]
    if existing and not overwrite:
        raise PruneError(f"output exists: {', '.join(existing)} (pass --overwrite to replace it)")
    if not bin_path.parent.is_dir():
        check_writable_parent(bin_path, "--output-prefix")  # a file on the way says so
        raise PruneError(f"--output-prefix {output_prefix}: folder {bin_path.parent} does not exist")
    check_writable_parent(bin_path, "--output-prefix")
    check_tokenizer_type(tokenizer_type, tokenizer)
    tok = TextTokenizer(tokenizer)  # validates the tokenizer before any output
    check_input_file(input_path)
    fmt = resolve_input_format(input_path, input_format)
    if fmt == "text" and json_key != "text":
        raise PruneError(f"--json-keys {json_key}: {input_path} is read as plain text, which has no fields; "
                         f"pass --input-format jsonl if it is JSON lines, or drop --json-keys")
    docs = read_documents(input_path, fmt, json_key)
    first = next(docs, None)  # surfaces a bad input file before any output
    if first is None:
        raise PruneError(f"--input {input_path}: no documents (blank lines and empty {json_key!r} fields hold none)")

    def all_docs() -> Iterator[str]:
        yield first
        yield from docs

    indexed = indexed_dataset_module()
    for p in (bin_path, idx_path):
        clean_stale_partials(p)
    tmp_bin, tmp_idx = (p.with_name(partial_name(p)) for p in (bin_path, idx_path))
    builder = indexed.IndexedDatasetBuilder(str(tmp_bin), dtype=indexed.DType.optimal_dtype(tok.info.vocab_size))
    n_docs = n_tokens = 0
    try:
        with encoder_pool(workers, tok.info.path) as pool:
            encoded = (pool.imap(_encode_in_worker, all_docs(), chunksize=16) if pool
                       else map(tok.encode_document, all_docs()))
            for ids in tqdm(encoded, desc="tokenize", unit="doc", disable=not progress):
                builder.add_document(np.asarray(ids, dtype=np.int64), [len(ids)])
                n_docs += 1
                n_tokens += len(ids)
        builder.finalize(str(tmp_idx))
        # .idx goes first, so that an interruption between the two renames leaves a .bin without an .idx (refused
        # on use) rather than a new .bin beside the old .idx of an overwritten dataset
        raise_if_interrupted()
        idx_path.unlink(missing_ok=True)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
        FINISHED.extend((bin_path, idx_path))
    finally:
        for t in (tmp_bin, tmp_idx):
            t.unlink(missing_ok=True)
    return PreprocessSummary(n_docs, n_tokens, bin_path, idx_path, fmt)
