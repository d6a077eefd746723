"""BPE tokenizers stored as ``tokenizer.json`` (the ``tokenizers`` library): rules and rewriting.

Two flavours keep every text encodable: byte-level BPE (GPT-2 / Qwen / SmolLM: the 256 byte symbols are
the alphabet) and BPE with byte fallback (LLaMA-style fast tokenizers: ``<0x00>``..``<0xFF>`` plus unk).

Merges are re-derived, not retrained: a merge ``(a, b)`` survives iff ``a``, ``b`` and ``a+b`` are all
kept, in the original order. Each kept token *pulls in* the operands of every merge producing it
(``VocabRules.parents``), so it stays reachable. Then encoding is unchanged for any word whose original
tokens are all kept: BPE applies the lowest-rank applicable merge at each step; the surviving merges are a
subset with the same relative order that still contains every merge that word used, so each step picks
the same merge.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from megatron.prune.errors import PruneError
from .rules import VocabRules

TOKENIZER_JSON = "tokenizer.json"
BYTE_LEVEL = "byte-level BPE"
BYTE_FALLBACK = "BPE with byte fallback"
BYTE_PIECES = tuple(f"<0x{b:02X}>" for b in range(256))


def load_json(folder: Path) -> dict[str, Any]:
    path = Path(folder) / TOKENIZER_JSON
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PruneError(f"cannot read {path}: {e}") from e


def _mentions(node: Any, type_name: str) -> bool:
    """Whether a (possibly nested Sequence) normalizer/pre-tokenizer/decoder config uses ``type_name``."""
    if isinstance(node, Mapping):
        return node.get("type") == type_name or any(_mentions(v, type_name) for v in node.values())
    if isinstance(node, list):
        return any(_mentions(v, type_name) for v in node)
    return False


def json_kind(data: Mapping[str, Any]) -> str:
    """Which supported BPE flavour ``data`` is, or a PruneError naming what it is."""
    model = data.get("model") or {}
    mtype = model.get("type", "unknown")
    if mtype != "BPE":
        raise PruneError(
            f"unsupported tokenizer type {mtype!r} in tokenizer.json; supported: {BYTE_LEVEL}, {BYTE_FALLBACK}, "
            f"SentencePiece (tokenizer.model)"
        )
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise PruneError("unsupported BPE tokenizer with a subword prefix/suffix; supported: "
                         f"{BYTE_LEVEL}, {BYTE_FALLBACK}")
    if _mentions(data.get("pre_tokenizer"), "ByteLevel") or _mentions(data.get("decoder"), "ByteLevel"):
        return BYTE_LEVEL
    if model.get("byte_fallback"):
        return BYTE_FALLBACK
    raise PruneError(
        "unsupported tokenizer type: BPE without byte-level symbols or byte fallback (some texts would not "
        f"encode after pruning); supported: {BYTE_LEVEL}, {BYTE_FALLBACK}, SentencePiece (tokenizer.model)"
    )


def merge_pairs(model: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Merges as pairs, whichever of the two on-disk spellings (``"a b"`` or ``["a", "b"]``) is used."""
    out = []
    for m in model.get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        out.append((a, b))
    return out


def json_tokens(data: Mapping[str, Any]) -> tuple[str, ...]:
    """Token string of every id (model vocab and added tokens), refusing holes or clashes."""
    by_id: dict[int, str] = {}
    for tok, i in data["model"]["vocab"].items():
        by_id[int(i)] = tok
    for a in data.get("added_tokens", []):
        if by_id.setdefault(int(a["id"]), a["content"]) != a["content"]:
            raise PruneError(f"tokenizer.json: id {a['id']} is both {by_id[a['id']]!r} and added {a['content']!r}")
    n = max(by_id) + 1 if by_id else 0
    if len(by_id) != n:
        raise PruneError(f"tokenizer.json: ids are not contiguous ({len(by_id)} tokens, highest id {n - 1})")
    return tuple(by_id[i] for i in range(n))


def json_rules(data: Mapping[str, Any], special: Sequence[str] = ()) -> VocabRules:
    """Always keep added tokens, ``special`` strings, unk and the fallback alphabet; a merge result needs its
    operands."""
    kind = json_kind(data)
    model = data["model"]
    tokens = json_tokens(data)
    ids = {t: i for i, t in enumerate(tokens)}
    required = {int(a["id"]) for a in data.get("added_tokens", [])}
    required |= {ids[t] for t in special if t in ids}
    if model.get("unk_token") in ids:
        required.add(ids[model["unk_token"]])
    if kind == BYTE_LEVEL:
        from tokenizers import pre_tokenizers

        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        alphabet = BYTE_PIECES
    required |= {ids[t] for t in alphabet if t in ids}
    parents: list[set[int]] = [set() for _ in tokens]
    for a, b in merge_pairs(model):
        if a in ids and b in ids and a + b in ids:
            parents[ids[a + b]] |= {ids[a], ids[b]}
    return VocabRules(kind, tokens, frozenset(required), tuple(tuple(sorted(p)) for p in parents))


def _remap_processor(node: Any, new_ids: Mapping[str, int]) -> Any:
    """Post-processor config with every (token, id) reference renumbered by token string."""
    if isinstance(node, list):
        if len(node) == 2 and isinstance(node[0], str) and isinstance(node[1], int):  # Bert/Roberta ("[SEP]", 102)
            return [node[0], new_ids[node[0]]]
        return [_remap_processor(v, new_ids) for v in node]
    if isinstance(node, dict):
        out = {k: _remap_processor(v, new_ids) for k, v in node.items()}
        if isinstance(node.get("ids"), list) and isinstance(node.get("tokens"), list):  # TemplateProcessing
            out["ids"] = [new_ids[t] for t in node["tokens"]]
        return out
    return node


def pruned_json(data: Mapping[str, Any], kept: Sequence[int]) -> dict[str, Any]:
    """``tokenizer.json`` keeping ids ``kept`` (new id = position in ``kept``) and the merges among them."""
    tokens = json_tokens(data)
    new_ids = {tokens[old]: new for new, old in enumerate(kept)}
    out = json.loads(json.dumps(data))  # deep copy
    model = out["model"]
    model["vocab"] = {t: new_ids[t] for t in sorted(new_ids, key=new_ids.__getitem__) if t in data["model"]["vocab"]}
    string_form = any(isinstance(m, str) for m in model.get("merges", []))
    merges = [(a, b) for a, b in merge_pairs(data["model"]) if a in new_ids and b in new_ids and a + b in new_ids]
    model["merges"] = [f"{a} {b}" for a, b in merges] if string_form else [[a, b] for a, b in merges]
    added = []
    for a in out.get("added_tokens", []):
        if a["content"] in new_ids:
            added.append({**a, "id": new_ids[a["content"]]})
    out["added_tokens"] = added
    if out.get("post_processor") is not None:
        out["post_processor"] = _remap_processor(out["post_processor"], new_ids)
    return out


def write_pruned_json(data: Mapping[str, Any], kept: Sequence[int], out_dir: Path) -> dict[str, Any]:
    """Write the pruned ``tokenizer.json`` (checked by loading it back with ``tokenizers``); return it."""
    from tokenizers import Tokenizer

    new = pruned_json(data, kept)
    text = json.dumps(new, ensure_ascii=False, indent=2)
    tok = Tokenizer.from_str(text)  # raises if a merge or special token no longer resolves
    if tok.get_vocab_size(with_added_tokens=True) != len(kept):
        raise PruneError(f"pruned tokenizer has {tok.get_vocab_size(True)} tokens, expected {len(kept)}")
    (Path(out_dir) / TOKENIZER_JSON).write_text(text, encoding="utf-8")
    return new


def write_slow_files(new: Mapping[str, Any], src_dir: Path, out_dir: Path) -> list[str]:
    """Rewrite GPT-2 style ``vocab.json`` / ``merges.txt`` when the source folder has them, so they agree."""
    written = []
    model = new["model"]
    if (Path(src_dir) / "vocab.json").is_file():
        (Path(out_dir) / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
        written.append("vocab.json")
    if (Path(src_dir) / "merges.txt").is_file():
        lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merge_pairs(model)]
        (Path(out_dir) / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append("merges.txt")
    return written
