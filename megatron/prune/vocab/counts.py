"""Token frequencies over a corpus, counted in several processes, saved with the identity of the tokenizer.

The counts file records the tokenizer's size and a hash of its token strings, so counts made with another
tokenizer are refused instead of silently selecting the wrong ids.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from tqdm import tqdm

from megatron.prune.errors import PruneError, json_type
from .rules import VocabRules

COUNTS_FORMAT = "megatron-prune-token-counts"
COUNTS_VERSION = 1
CHUNK_CHARS = 1 << 20  # text per task: large enough to amortise inter-process traffic
MAX_VOCAB = 1 << 24  # the largest vocabulary a counts file may describe (today's largest tokenizers: ~256k)


@dataclass(frozen=True)
class TokenCounts:
    """How often each id occurred, and which tokenizer produced the ids."""

    kind: str
    vocab_size: int
    vocab_hash: str
    counts: tuple[int, ...]  # per id
    sources: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(self.counts)

    def check_matches(self, rules: VocabRules, where: str = "counts") -> None:
        """PruneError unless these counts were made with the tokenizer ``rules`` describes."""
        if self.vocab_size != rules.size or self.vocab_hash != rules.vocab_hash:
            raise PruneError(
                f"{where} were made with a different tokenizer ({self.kind}, {self.vocab_size} tokens, hash "
                f"{self.vocab_hash[:12]}) than this one ({rules.kind}, {rules.size} tokens, hash "
                f"{rules.vocab_hash[:12]}); recount with `megatron-prune vocab count`"
            )

    def to_dict(self) -> dict:
        return {
            "format": COUNTS_FORMAT,
            "version": COUNTS_VERSION,
            "tokenizer": {"kind": self.kind, "vocab_size": self.vocab_size, "vocab_hash": self.vocab_hash},
            "sources": list(self.sources),
            "num_tokens": self.num_tokens,
            "counts": {str(i): c for i, c in enumerate(self.counts) if c},  # sparse: id -> count
        }

    def save(self, path: Path) -> Path:
        """Write atomically (temp file renamed into place)."""
        from megatron.prune.io.atomic import atomic_file

        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1))
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> "TokenCounts":
        """Read a counts file of ``vocab count``; damage is refused naming the entry (:func:`counts_entries`)."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PruneError(f"cannot read counts file {path}: {e}") from None
        if (not isinstance(d, dict) or d.get("format") != COUNTS_FORMAT or d.get("version") != COUNTS_VERSION
                or not isinstance(d.get("tokenizer"), dict)):
            raise PruneError(f"{path} is not a token-counts file (version {COUNTS_VERSION}) of megatron-prune; "
                             "write one with `megatron-prune vocab count`")
        tok = d["tokenizer"]
        n = tok.get("vocab_size")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or not all(
                isinstance(tok.get(k), str) for k in ("kind", "vocab_hash")):
            raise PruneError(f"{path}: its 'tokenizer' entry {json.dumps(tok)} lacks a whole-number vocab_size, a "
                             "kind or a vocab_hash; recount with `megatron-prune vocab count`")
        if n > MAX_VOCAB:  # a count per id is allocated below: refuse before a damaged size takes the memory
            raise PruneError(f"{path}: vocab_size {n} is beyond any tokenizer's (at most {MAX_VOCAB:,}); recount with "
                             "`megatron-prune vocab count`")
        counts = [0] * n
        for i, c in counts_entries(path, d.get("counts"), n):
            counts[i] = c
        sources = d.get("sources", ())
        return cls(tok["kind"], n, tok["vocab_hash"], tuple(counts),
                   tuple(map(str, sources)) if isinstance(sources, list) else ())


def counts_entries(path: Path, counts: object, vocab_size: int) -> Iterator[tuple[int, int]]:
    """(id, count) of a counts file's ``counts`` object: each key an id below ``vocab_size``, each value a whole
    number >= 0; the first bad key or value is refused by name."""
    if not isinstance(counts, dict):
        raise PruneError(f"{path}: 'counts' is a JSON {json_type(counts)}, not an object of token id -> count")
    for key, c in counts.items():
        if not (key.isdecimal() and int(key) < vocab_size):  # isdigit() takes "²", which int() refuses
            raise PruneError(f"{path}: counts key {key!r} is not a token id of the {vocab_size}-token vocabulary "
                             f"(0 to {vocab_size - 1})")
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise PruneError(f"{path}: the count of token id {key} is {json.dumps(c)}, not a whole number >= 0")
        yield int(key), c


def check_data_files(paths: Sequence[Path | str]) -> list[Path]:
    """Existing files (read as ``megatron-prune data`` reads them), else a PruneError naming the offending path."""
    from megatron.prune.data import check_input_file

    if not paths:
        raise PruneError("no data files given")
    for p in paths:
        check_input_file(p, "--data", several=True)
        if Path(p).stat().st_size == 0:
            raise PruneError(f"--data {p}: the file is empty; there is nothing to count")
    return list(map(Path, paths))


def iter_tasks(paths: Sequence[Path], chunk_chars: int = CHUNK_CHARS) -> Iterator[tuple[str, int, str]]:
    """(format:path, first line number, raw text) pieces of the corpus, cut at line boundaries; formats, gzip and
    UTF-8 errors as in ``megatron-prune data``."""
    from megatron.prune.data import numbered_lines, resolve_input_format

    for p in paths:
        tag = f"{resolve_input_format(p, flag='--data')}:{p}"
        buf: list[str] = []
        size, start = 0, 1
        for n, line in numbered_lines(p, "--data"):
            buf.append(line)
            size += len(line)
            if size >= chunk_chars:
                yield tag, start, "".join(buf)
                buf, size, start = [], 0, n + 1
        if buf:
            yield tag, start, "".join(buf)


def _documents(tag: str, start: int, raw: str) -> list[str]:
    """A plain-text piece is one document; a JSON-lines piece has one document (its ``text``) per non-empty line."""
    from megatron.prune.data import json_document
    from megatron.prune.text import TEXT_FIELD_ONLY

    kind, path = tag.split(":", 1)
    if kind == "text":
        return [raw]
    return [json_document(line, "text", f"{path}:{n}", TEXT_FIELD_ONLY)
            for n, line in enumerate(raw.splitlines(), start) if line.strip()]


_ENCODER = None


def _init_worker(tokenizer_dir: str, parent_pid: int | None = None) -> None:
    global _ENCODER
    if parent_pid is not None:  # a pool worker: it ends with the counting process, however that ends
        from megatron.prune.io.workers import end_with_parent

        end_with_parent(parent_pid)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    from .folder import make_encoder

    _ENCODER = make_encoder(tokenizer_dir)


def _count_task(task: tuple[str, int, str]) -> tuple[Counter, int]:
    counter: Counter = Counter()
    for ids in _ENCODER(_documents(*task)):
        counter.update(ids)
    return counter, len(task[2].encode("utf-8"))


def count_tokens(tokenizer_dir: Path, data: Sequence[Path | str], rules: VocabRules, workers: int = 0,
                 progress: bool = True, chunk_chars: int = CHUNK_CHARS) -> TokenCounts:
    """Count token ids of ``data`` (txt: whole file text; jsonl: ``text`` per line) in ``workers`` processes."""
    paths = check_data_files(data)
    workers = workers or min(4, os.cpu_count() or 1)
    total = sum(p.stat().st_size for p in paths)
    counter: Counter = Counter()
    bar = tqdm(total=total, desc="counting tokens", unit="B", unit_scale=True, disable=not progress)
    tasks = iter_tasks(paths, chunk_chars)
    if workers == 1:
        _init_worker(str(tokenizer_dir))
        results = map(_count_task, tasks)
        for c, n in results:
            counter.update(c)
            bar.update(n)
    else:
        import multiprocessing as mp

        # spawn, not fork: the caller may hold torch / tokenizers threads, and forking those can deadlock.
        # As with any spawn pool, a calling script needs an ``if __name__ == "__main__":`` guard.
        with mp.get_context("spawn").Pool(workers, _init_worker, (str(tokenizer_dir), os.getpid())) as pool:
            for c, n in pool.imap_unordered(_count_task, tasks):
                counter.update(c)
                bar.update(n)
    bar.close()
    if not counter:
        raise PruneError(f"--data {' '.join(map(str, paths))}: no text to count (only blank lines?)")
    bad = [i for i in counter if not 0 <= i < rules.size]
    if bad:
        raise PruneError(f"the tokenizer produced id {bad[0]} outside its vocabulary of {rules.size}")
    counts = tuple(counter.get(i, 0) for i in range(rules.size))
    return TokenCounts(rules.kind, rules.size, rules.vocab_hash, counts, tuple(str(p) for p in paths))
