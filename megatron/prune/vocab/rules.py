"""What a tokenizer demands of any kept-id set, in one format-free record.

Every supported tokenizer format reduces to :class:`VocabRules`: its size, a hash of its token strings
(so counts made with another tokenizer are caught), the ids that must always stay (special tokens and
the fallback alphabet that lets any text encode), and per id the other ids it needs to stay reachable.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Sequence

from megatron.prune.errors import PruneError


@dataclass(frozen=True)
class VocabRules:
    """The constraints a kept-id set must satisfy for one tokenizer (ids in source numbering)."""

    kind: str  # human-readable tokenizer type, e.g. "byte-level BPE"
    tokens: tuple[str, ...]  # token string of each id
    required: frozenset[int]  # always kept: special tokens and the fallback alphabet
    parents: tuple[tuple[int, ...], ...]  # per id: ids that must also stay for it to be produced

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def vocab_hash(self) -> str:
        return vocab_hash(self.tokens)

    def merged(self, other: "VocabRules") -> "VocabRules":
        """Both sets of constraints (two files describing one vocabulary, e.g. tokenizer.model + tokenizer.json)."""
        if other.tokens != self.tokens:
            raise PruneError(f"the {self.kind} and {other.kind} files of this tokenizer disagree on the vocabulary")
        return VocabRules(
            f"{self.kind} + {other.kind}",
            self.tokens,
            self.required | other.required,
            tuple(tuple(sorted(set(a) | set(b))) for a, b in zip(self.parents, other.parents)),
        )


def vocab_hash(tokens: Sequence[str]) -> str:
    """sha256 over the id-ordered token strings: equal only for the same vocabulary in the same numbering."""
    h = hashlib.sha256()
    for t in tokens:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def missing_ancestors(token: int, kept: set[int], rules: VocabRules) -> list[int]:
    """``token`` and every id it transitively needs that is not in ``kept`` yet (parents before children)."""
    out: list[int] = []
    seen: set[int] = set()
    stack: list[tuple[int, bool]] = [(token, False)]
    while stack:
        t, expanded = stack.pop()
        if expanded:
            out.append(t)
            continue
        if t in kept or t in seen:
            continue
        seen.add(t)
        stack.append((t, True))
        stack.extend((p, False) for p in rules.parents[t] if p not in kept and p not in seen)
    return out


def closure(ids: Iterable[int], rules: VocabRules) -> set[int]:
    """``ids`` plus everything they transitively need."""
    kept: set[int] = set()
    for t in ids:
        kept.update(missing_ancestors(t, kept, rules))
    return kept


def minimum_keep(rules: VocabRules) -> int:
    """The smallest vocabulary this tokenizer can be pruned to: the always-kept set and what it needs."""
    return len(closure(rules.required, rules))


def check_ids(ids: Iterable[int], rules: VocabRules, what: str) -> list[int]:
    """``ids`` as ints inside [0, size), else a PruneError naming the first bad one."""
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < rules.size:
            raise PruneError(f"{what}: token id {i!r} is out of range [0, {rules.size}) for this {rules.kind} "
                             "tokenizer")
        out.append(i)
    return out


def check_keep(keep: int, rules: VocabRules) -> None:
    """Refuse a vocabulary size the tokenizer cannot be pruned to (before any counting)."""
    floor = minimum_keep(rules)
    if not floor <= keep <= rules.size:
        raise PruneError(
            f"--keep {keep} is outside [{floor}, {rules.size}]: this {rules.kind} tokenizer must keep at least "
            f"{floor} tokens (special tokens and the byte/unk fallback that lets any text encode)"
        )


def select_top(counts: Sequence[int], keep: int, rules: VocabRules) -> tuple[int, ...]:
    """Exactly ``keep`` ids: the always-kept set, then the most frequent ids with what they need.

    Ids are taken by (count desc, id asc); an id is taken only together with its missing ancestors and
    skipped when they do not fit, so every kept id stays reachable. Zero-count ids fill up in id order
    (lower ids are the earlier, more common merges). Exactness: a dropped id whose ancestors are all kept
    always exists while the set is incomplete, so repeated passes reach ``keep``.
    """
    if len(counts) != rules.size:
        raise PruneError(f"counts cover {len(counts)} ids but the tokenizer has {rules.size}")
    check_keep(keep, rules)
    kept = closure(rules.required, rules)
    order = sorted(range(rules.size), key=lambda i: (-counts[i], i))
    while len(kept) < keep:
        before = len(kept)
        for t in order:
            if len(kept) == keep:
                break
            if t in kept:
                continue
            need = missing_ancestors(t, kept, rules)
            if len(kept) + len(need) <= keep:
                kept.update(need)
        if len(kept) == before:  # cannot happen for an acyclic parent relation; guard against a broken one
            raise PruneError(f"cannot choose exactly {keep} reachable tokens (stuck at {len(kept)})")
    return tuple(sorted(kept))


def complete_ids(ids: Iterable[int], rules: VocabRules, what: str) -> tuple[int, ...]:
    """User-given ids plus the always-kept set and everything they need, sorted."""
    return tuple(sorted(closure(list(rules.required) + check_ids(ids, rules, what), rules)))
