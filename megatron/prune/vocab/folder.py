"""A tokenizer folder as one object: detect its format, derive its rules, write its pruned copy.

Recognised files: ``tokenizer.json`` (byte-level BPE or BPE with byte fallback) and ``tokenizer.model``
(SentencePiece). When both are present (LLaMA-style HF folders) they must describe the same vocabulary and
both are rewritten with the same kept ids. ``tokenizer_config.json`` (``added_tokens_decoder``) and the
GPT-2 style ``vocab.json`` / ``merges.txt`` are renumbered to match; other side files are copied.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from megatron.prune.errors import PruneError
from . import bpe, spm
from .rules import VocabRules

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")
ADDED_TOKENS = "added_tokens.json"
REWRITTEN = {bpe.TOKENIZER_JSON, spm.SPM_FILE, TOKENIZER_CONFIG, ADDED_TOKENS, "vocab.json", "merges.txt"}


@dataclass(frozen=True)
class TokenizerFolder:
    """A tokenizer on disk with the rules any pruning of it must follow."""

    folder: Path
    rules: VocabRules
    json_data: Mapping[str, Any] | None  # parsed tokenizer.json
    spm_proto: Any | None  # sentencepiece ModelProto
    config: Mapping[str, Any]  # tokenizer_config.json ({} when absent)

    @property
    def kind(self) -> str:
        return self.rules.kind

    def with_required(self, ids: Iterable[int]) -> "TokenizerFolder":
        """The same tokenizer with extra always-kept ids (e.g. the special ids a model config names)."""
        extra = frozenset(i for i in ids if 0 <= i < self.rules.size)
        return dataclasses.replace(self, rules=dataclasses.replace(self.rules, required=self.rules.required | extra))


def _token_str(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def special_strings(*configs: Mapping[str, Any]) -> list[str]:
    """Every special token string a tokenizer config or special-tokens map names."""
    out: list[str] = []
    for cfg in configs:
        for key in SPECIAL_KEYS:
            s = _token_str(cfg.get(key))
            if s is not None:
                out.append(s)
        for key in ("additional_special_tokens", "extra_special_tokens"):
            vals = cfg.get(key) or []
            vals = vals.values() if isinstance(vals, Mapping) else vals
            out.extend(s for s in map(_token_str, vals) if s is not None)
        for entry in (cfg.get("added_tokens_decoder") or {}).values():
            s = _token_str(entry)
            if s is not None:
                out.append(s)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PruneError(f"cannot read {path}: {e}") from e


def open_tokenizer(folder: Path | str) -> TokenizerFolder:
    """Load the tokenizer files of ``folder``; PruneError if none is there or the type is unsupported."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PruneError(f"tokenizer folder {folder} does not exist")
    config = _read_json(folder / TOKENIZER_CONFIG)
    special = special_strings(config, _read_json(folder / SPECIAL_TOKENS_MAP))
    has_json, has_spm = (folder / bpe.TOKENIZER_JSON).is_file(), (folder / spm.SPM_FILE).is_file()
    if not (has_json or has_spm):
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".tiktoken", ".txt", ".json", ".model"))
        raise PruneError(
            f"no supported tokenizer in {folder} (found: {', '.join(others) or 'nothing'}); supported: "
            f"{bpe.TOKENIZER_JSON} ({bpe.BYTE_LEVEL} or {bpe.BYTE_FALLBACK}), {spm.SPM_FILE} (SentencePiece)"
        )
    json_data = bpe.load_json(folder) if has_json else None
    proto = spm.load_proto(folder / spm.SPM_FILE) if has_spm else None
    rules = None
    if proto is not None:
        rules = spm.spm_rules(proto, special)
    if json_data is not None:
        jr = bpe.json_rules(json_data, special)
        rules = jr if rules is None else rules.merged(jr)
    assert rules is not None
    return TokenizerFolder(folder, rules, json_data, proto, config)


def tokenizer_tokens(path: Path | str) -> tuple[str, ...] | None:
    """Token string of each id of the tokenizer at ``path`` (a folder or a SentencePiece ``.model`` file);
    None where there is none we read. Cheap (no rules): for comparing two vocabularies id by id."""
    path = Path(path)
    if path.is_file():
        return tuple(p.piece for p in spm.load_proto(path).pieces)
    if (path / bpe.TOKENIZER_JSON).is_file():
        return bpe.json_tokens(bpe.load_json(path))
    if (path / spm.SPM_FILE).is_file():
        return tuple(p.piece for p in spm.load_proto(path / spm.SPM_FILE).pieces)
    return None


def first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    """Where two token lists part, in words (for error messages)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"id {i} is {x!r} vs {y!r}"
    return f"{len(a)} vs {len(b)} tokens" if len(a) != len(b) else "identical"


def make_encoder(folder: Path | str) -> Callable[[list[str]], list[list[int]]]:
    """A batch encoder (no special tokens added) for counting: ``tokenizers`` when there is a tokenizer.json."""
    folder = Path(folder)
    if (folder / bpe.TOKENIZER_JSON).is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(folder / bpe.TOKENIZER_JSON))
        return lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / spm.SPM_FILE))
    return lambda texts: sp.encode(texts)


def pruned_tokenizer_config(config: Mapping[str, Any], tokens: Sequence[str], kept: Sequence[int]) -> dict[str, Any]:
    """``tokenizer_config.json`` with ``added_tokens_decoder`` keys renumbered (dropped entries removed)."""
    out = dict(config)
    if "added_tokens_decoder" in config:
        new_ids = {tokens[old]: new for new, old in enumerate(kept)}
        dec = {}
        for _, entry in config["added_tokens_decoder"].items():
            content = _token_str(entry)
            if content in new_ids:
                dec[str(new_ids[content])] = entry
        out["added_tokens_decoder"] = dict(sorted(dec.items(), key=lambda kv: int(kv[0])))
    return out


def write_pruned_tokenizer(tf: TokenizerFolder, kept: Sequence[int], out_dir: Path,
                           copy_side_files: bool = True) -> list[str]:
    """Write the pruned tokenizer files into ``out_dir`` (new id = position in ``kept``); return their names."""
    out_dir = Path(out_dir)
    written: list[str] = []
    if tf.spm_proto is not None:
        spm.write_pruned_proto(tf.spm_proto, kept, out_dir / spm.SPM_FILE)
        written.append(spm.SPM_FILE)
    if tf.json_data is not None:
        new = bpe.write_pruned_json(tf.json_data, kept, out_dir)
        written.append(bpe.TOKENIZER_JSON)
        written += bpe.write_slow_files(new, tf.folder, out_dir)
    if (tf.folder / TOKENIZER_CONFIG).is_file():
        cfg = pruned_tokenizer_config(tf.config, tf.rules.tokens, kept)
        (out_dir / TOKENIZER_CONFIG).write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
        written.append(TOKENIZER_CONFIG)
    if (tf.folder / ADDED_TOKENS).is_file():  # slow-tokenizer list {content: id}
        new_ids = {tf.rules.tokens[old]: new for new, old in enumerate(kept)}
        added = {t: new_ids[t] for t in _read_json(tf.folder / ADDED_TOKENS) if t in new_ids}
        (out_dir / ADDED_TOKENS).write_text(json.dumps(added, indent=2, ensure_ascii=False), encoding="utf-8")
        written.append(ADDED_TOKENS)
    if copy_side_files:
        for f in sorted(tf.folder.iterdir()):
            if f.is_file() and f.name not in REWRITTEN and _is_tokenizer_side_file(f.name):
                shutil.copy2(f, out_dir / f.name)
    return written


def _is_tokenizer_side_file(name: str) -> bool:
    return name in (SPECIAL_TOKENS_MAP, "chat_template.jinja", "chat_template.json")


def check_loads(out_dir: Path, size: int) -> None:
    """The pruned folder loads with ``transformers.AutoTokenizer`` and has ``size`` tokens."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(out_dir))
    except Exception as e:  # any loader failure means we wrote something unusable
        raise PruneError(f"the pruned tokenizer in {out_dir} does not load with AutoTokenizer: {e}") from e
    if len(tok) != size:
        raise PruneError(f"the pruned tokenizer in {out_dir} loads with {len(tok)} tokens, expected {size}")
