"""Vocabulary pruning end to end: choose the kept ids, write the pruned tokenizer and (for a model) weights.

The model side is one more axis of the prune plan: ``PrunePlan.keep_all(shape)`` with ``vocab`` = the kept
ids and ``target.vocab_size`` = their count, applied by the HF adapter like any other plan. New token id =
position in the kept list, the same numbering the embedding rows get.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from megatron.prune.core.plan import PrunePlan
from megatron.prune.core.shape import ModelShape
from megatron.prune.errors import PruneError
from .counts import TokenCounts
from .folder import TokenizerFolder, check_loads, open_tokenizer, write_pruned_tokenizer
from .rules import VocabRules, complete_ids, select_top

SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id")
GENERATION_CONFIG = "generation_config.json"


def read_keep_ids(path: Path | str) -> list[int]:
    """Kept ids from a file: a JSON list, a JSON object with a ``kept`` list, or integers separated by space/commas;
    refused when it holds none, or anything but whole numbers."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PruneError(f"cannot read --keep-ids file {path}: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = text.replace(",", " ").split()
        for word in data:
            if not re.fullmatch(r"[+-]?\d+", word):
                raise PruneError(f"--keep-ids file {path}: {word!r} is not a token id") from None
        data = [int(w) for w in data]
    if isinstance(data, Mapping):
        data = data.get("kept")
    if not isinstance(data, list):
        raise PruneError(f"--keep-ids file {path}: expected a list of token ids (or an object with 'kept')")
    odd = next((v for v in data if isinstance(v, bool) or not isinstance(v, int)), None)
    if odd is not None:
        raise PruneError(f"--keep-ids file {path}: {odd!r} is not a token id (whole numbers only)")
    if not data:
        raise PruneError(f"--keep-ids file {path} holds no token ids; list the ids to keep")
    return list(data)


def choose_kept(rules: VocabRules, keep: int | None = None, keep_ids: Sequence[int] | None = None,
                counts: TokenCounts | None = None, like: Sequence[str] | None = None) -> tuple[int, ...]:
    """The kept ids (sorted): top ``keep`` by counts (id order without counts), ``keep_ids`` completed, or
    exactly the tokens of ``like`` (a vocabulary pruned from this one).

    The first two always include the special tokens, the fallback alphabet and whatever keeps each kept token
    reachable; ``keep`` is the exact final size; ``like`` must already hold all of those.
    """
    if sum(x is not None for x in (keep, keep_ids, like)) != 1:
        raise PruneError("give exactly one of --keep N, --keep-ids FILE and --like TOKENIZER")
    if counts is not None:
        counts.check_matches(rules)
    if keep is not None:
        return select_top(counts.counts if counts else [0] * rules.size, keep, rules)
    if like is not None:
        return ids_like(rules, like)
    return complete_ids(keep_ids, rules, "--keep-ids")


def ids_like(rules: VocabRules, tokens: Sequence[str]) -> tuple[int, ...]:
    """The ids of ``tokens`` in ``rules``' vocabulary, which must be a pruning of it (what `vocab prune` writes:
    the same strings in the same order, the always-kept ones included), so both number the tokens alike."""
    ids: list[int] = []
    for i, tok in enumerate(rules.tokens):  # a pruned vocabulary is a subsequence of its source
        if len(ids) < len(tokens) and tok == tokens[len(ids)]:
            ids.append(i)
    not_pruned = "; it was not pruned from this vocabulary (give the tokenizer `vocab prune` wrote for a model " \
                 "pruned from this one)"
    if len(ids) < len(tokens):
        raise PruneError(f"--like: its token {len(ids)} {tokens[len(ids)]!r} does not occur in the input's "
                         f"vocabulary after id {ids[-1] if ids else -1}{not_pruned}")
    needed = sorted(set(complete_ids(ids, rules, "--like")) - set(ids))
    if needed:
        named = ", ".join(f"{i} {rules.tokens[i]!r}" for i in needed[:5])
        raise PruneError(f"--like: it lacks {len(needed)} token(s) the input's vocabulary always keeps or needs "
                         f"to reach the kept ones (ids {named}){not_pruned}")
    return tuple(ids)


def remap_special_ids(config: Mapping[str, Any], kept: Sequence[int], where: str) -> dict[str, Any]:
    """``config`` with bos/eos/pad(/decoder start) ids renumbered; PruneError if one of them was dropped."""
    new = {old: n for n, old in enumerate(kept)}
    out = dict(config)

    def one(key: str, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int):
            return v
        if v not in new:
            raise PruneError(f"{where}: {key} {v} is not among the kept token ids")
        return new[v]

    for key in SPECIAL_ID_KEYS:
        v = config.get(key)
        if isinstance(v, list):
            out[key] = [one(key, x) for x in v]
        elif v is not None:
            out[key] = one(key, v)
    return out


def config_special_ids(*configs: Mapping[str, Any]) -> set[int]:
    """Every special token id named in HF model/generation configs (those must survive)."""
    ids: set[int] = set()
    for cfg in configs:
        for key in SPECIAL_ID_KEYS:
            v = cfg.get(key)
            for x in v if isinstance(v, list) else [v]:
                if isinstance(x, int) and not isinstance(x, bool):
                    ids.add(x)
    return ids


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def prune_tokenizer(tokenizer_dir: Path | str, output: Path | str, keep: int | None = None,
                    keep_ids: Sequence[int] | None = None, counts: TokenCounts | None = None,
                    overwrite: bool = False, verify: bool = True,
                    like: Sequence[str] | None = None) -> tuple[int, ...]:
    """Write a pruned copy of a tokenizer folder (no model); returns the kept ids in source numbering."""
    from megatron.prune.io.atomic import atomic_output, check_output_path

    tf = open_tokenizer(tokenizer_dir)
    kept = choose_kept(tf.rules, keep, keep_ids, counts, like)
    check_output_path(Path(tokenizer_dir), Path(output), overwrite)
    with atomic_output(Path(output), overwrite) as tmp:
        write_pruned_tokenizer(tf, kept, tmp)
        (tmp / "kept_token_ids.json").write_text(json.dumps({"kept": list(kept)}))
        if verify and (tmp / "tokenizer.json").is_file():
            check_loads(tmp, len(kept))
    return kept


def vocab_plan(shape: ModelShape, kept: Sequence[int], info: Mapping[str, Any] | None = None) -> PrunePlan:
    """The identity plan on every axis but the vocabulary, which keeps ``kept`` (source numbering)."""
    plan = dataclasses.replace(
        PrunePlan.keep_all(shape),
        vocab=tuple(kept),
        target=shape.replace(vocab_size=len(kept)),
        info={"method": "vocab", **(info or {})},
    )
    return plan.validate()


def prepare_model(input_dir: Path, keep: int | None, keep_ids: Sequence[int] | None,
                  counts: TokenCounts | None, like: Sequence[str] | None = None
                  ) -> tuple[TokenizerFolder, tuple[int, ...], ModelShape, dict, dict]:
    """Checks shared by every checkpoint format: tokenizer present, sizes agree, special ids kept."""
    from megatron.prune.core.shape import shape_from_hf_config

    config = _read_json(input_dir / "config.json")
    if not config:
        raise PruneError(f"{input_dir} has no config.json: not an HF model folder")
    shape = shape_from_hf_config(config)
    gen = _read_json(input_dir / GENERATION_CONFIG)
    tf = open_tokenizer(input_dir).with_required(config_special_ids(config, gen))
    if tf.rules.size > shape.vocab_size:
        raise PruneError(f"the tokenizer has {tf.rules.size} tokens but the model only {shape.vocab_size} rows")
    kept = choose_kept(tf.rules, keep, keep_ids, counts, like)
    return tf, kept, shape, config, gen


def prune_hf_vocab(input_dir: Path | str, output: Path | str, keep: int | None = None,
                   keep_ids: Sequence[int] | None = None, counts: TokenCounts | None = None,
                   overwrite: bool = False, progress: bool = True, verify: bool = True,
                   like: Sequence[str] | None = None) -> PrunePlan:
    """Vocabulary-prune an HF model folder: sliced embedding/lm_head rows, pruned tokenizer, fixed configs.

    Rows past the tokenizer's size (padding some models carry) are dropped with the unkept tokens.
    """
    from megatron.prune.formats.hf import HFCheckpoint, check_hf_target, write_pruned
    from megatron.prune.io.atomic import atomic_output, check_output_path

    input_dir, output = Path(input_dir), Path(output)
    tf, kept, shape, config, gen = prepare_model(input_dir, keep, keep_ids, counts, like)
    ckpt = HFCheckpoint.open(input_dir)
    plan = vocab_plan(shape, kept, {"tokenizer": tf.kind, "keep": len(kept)})
    check_hf_target(plan.target, config)
    check_output_path(input_dir, output, overwrite)
    with atomic_output(output, overwrite) as tmp:
        write_pruned(ckpt, plan, tmp, progress=progress)
        write_pruned_tokenizer(tf, kept, tmp)
        new_cfg = remap_special_ids(_read_json(tmp / "config.json"), kept, "config.json")
        (tmp / "config.json").write_text(json.dumps(new_cfg, indent=2, sort_keys=True))
        if gen:
            new_gen = remap_special_ids(gen, kept, GENERATION_CONFIG)
            (tmp / GENERATION_CONFIG).write_text(json.dumps(new_gen, indent=2))
        if verify and (tmp / "tokenizer.json").is_file():
            check_loads(tmp, len(kept))
    return plan


def prune_megatron_vocab(input_dir: Path | str, output: Path | str, keep: int | None = None,
                         keep_ids: Sequence[int] | None = None, counts: TokenCounts | None = None,
                         overwrite: bool = False, progress: bool = True,
                         like: Sequence[str] | None = None) -> PrunePlan:
    """Vocabulary-prune a Megatron checkpoint through the Megatron adapter, at the checkpoint's own TP/PP.

    The adapter gathers the vocab-parallel embedding / output layer, keeps the plan's rows, re-pads the
    vocabulary for the TP size and rewrites every shard. The tokenizer lives in ``hf_meta/``: it is pruned
    and checked in a scratch folder first, then swapped in, so a bad tokenizer never leaves new weights.
    """
    import shutil
    import tempfile

    from megatron.prune.formats.folder import open_megatron
    from megatron.prune.formats.mcore.ops import apply_plan
    from megatron.prune.formats.mcore.schema import META_DIR

    input_dir, output = Path(input_dir), Path(output)
    src = open_megatron(input_dir)
    meta = input_dir / META_DIR
    if not meta.is_dir():
        raise PruneError(f"{input_dir} has no {META_DIR}/ folder with the tokenizer; convert it with "
                         "`megatron-prune convert` from an HF folder that has one")
    gen = _read_json(meta / GENERATION_CONFIG)
    tf = open_tokenizer(meta).with_required(config_special_ids(src.hf_config, gen))
    if tf.rules.size > src.shape.vocab_size:
        raise PruneError(f"the tokenizer has {tf.rules.size} tokens but the model only {src.shape.vocab_size} rows")
    kept = choose_kept(tf.rules, keep, keep_ids, counts, like)
    plan = vocab_plan(src.shape, kept, {"tokenizer": tf.kind, "keep": len(kept)})
    remap_special_ids(src.hf_config, kept, f"{META_DIR}/config.json")  # fail early if an id would vanish
    with tempfile.TemporaryDirectory(prefix="vocab-tokenizer-") as scratch:
        staged = Path(scratch)
        write_pruned_tokenizer(tf, kept, staged)
        if (staged / "tokenizer.json").is_file():
            check_loads(staged, len(kept))
        # unbalance = gather, slice, re-shard: kept ids are not spread evenly over the TP vocab slices
        apply_plan(src, plan, output, overwrite, prune_type="unbalance", tp=src.tp, pp=src.pp, progress=progress)
        try:
            out_meta = output / META_DIR
            for f in staged.iterdir():
                shutil.copy2(f, out_meta / f.name)
            cfg = remap_special_ids(_read_json(out_meta / "config.json"), kept, f"{META_DIR}/config.json")
            (out_meta / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
            if gen:
                new_gen = remap_special_ids(gen, kept, GENERATION_CONFIG)
                (out_meta / GENERATION_CONFIG).write_text(json.dumps(new_gen, indent=2))
        except BaseException:
            shutil.rmtree(output, ignore_errors=True)  # new weights with the old tokenizer must not survive
            raise
    return plan
