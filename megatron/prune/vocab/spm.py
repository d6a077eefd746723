"""SentencePiece tokenizers (``tokenizer.model``): rules and rewriting by editing the ModelProto, no retraining.

Ids are positions in ``ModelProto.pieces``, so pruning keeps the chosen pieces in order and renumbers.
Always kept: unk, control and user-defined pieces and, with byte fallback, the 256 ``<0x..>`` pieces.

Unigram needs nothing more: encoding is a Viterbi search over pieces, and removing pieces the best
segmentation did not use leaves that segmentation the best. BPE merges adjacent symbols whose
concatenation is a piece, highest score first; a kept piece needs the intermediate pieces its own
merge sequence builds (found by replaying that sequence on the piece alone), which are pulled in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from megatron.prune.errors import PruneError
from .rules import VocabRules

SPM_FILE = "tokenizer.model"
SENTENCEPIECE = "SentencePiece"


def _pb():
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2


def load_proto(path: Path):
    """Parse a SentencePiece model file into its ModelProto."""
    m = _pb().ModelProto()
    try:
        m.ParseFromString(Path(path).read_bytes())
    except Exception as e:  # protobuf raises DecodeError, a plain Exception subclass
        raise PruneError(f"cannot read SentencePiece model {path}: {e}") from e
    if not m.pieces:
        raise PruneError(f"{path} is not a SentencePiece model (no pieces)")
    return m


def model_type_name(m) -> str:
    return _pb().TrainerSpec.ModelType.Name(m.trainer_spec.model_type)


def bpe_intermediates(piece: str, scores: dict[str, float]) -> list[str]:
    """Pieces built while SentencePiece's BPE encodes ``piece`` alone (highest score first, then leftmost)."""
    syms = list(piece)
    if len(syms) < 2:
        return []
    built: list[str] = []
    while len(syms) > 1:
        best: tuple[float, int] | None = None
        for i in range(len(syms) - 1):
            s = scores.get(syms[i] + syms[i + 1])
            if s is not None and (best is None or (-s, i) < best):
                best = (-s, i)
        if best is None:
            break
        i = best[1]
        syms[i : i + 2] = [syms[i] + syms[i + 1]]
        built.append(syms[i])
    return [b for b in built if b != piece]


def spm_rules(m, special: Sequence[str] = ()) -> VocabRules:
    """Constraints of a SentencePiece model; refuses model types other than unigram and BPE."""
    pb = _pb()
    P = pb.ModelProto.SentencePiece
    mtype = model_type_name(m)
    if mtype not in ("UNIGRAM", "BPE"):
        raise PruneError(f"unsupported tokenizer type: SentencePiece {mtype} model; supported: SentencePiece "
                         "UNIGRAM and BPE, byte-level BPE, BPE with byte fallback")
    tokens = tuple(p.piece for p in m.pieces)
    ids = {t: i for i, t in enumerate(tokens)}
    always = {P.UNKNOWN, P.CONTROL, P.USER_DEFINED, P.BYTE}
    required = {i for i, p in enumerate(m.pieces) if p.type in always} | {ids[t] for t in special if t in ids}
    parents: list[tuple[int, ...]] = [()] * len(tokens)
    if mtype == "BPE":
        # pieces that take part in merges: normal and user-defined (unused ones are skipped by the encoder)
        scores = {p.piece: p.score for p in m.pieces if p.type in (P.NORMAL, P.USER_DEFINED)}
        for i, p in enumerate(m.pieces):
            if p.type == P.NORMAL:
                parents[i] = tuple(sorted({ids[b] for b in bpe_intermediates(p.piece, scores)}))
    return VocabRules(f"{SENTENCEPIECE} {mtype.lower()}", tokens, frozenset(required), tuple(parents))


def pruned_proto(m, kept: Sequence[int]):
    """A copy of ``m`` with only the ``kept`` pieces (in order); trainer-spec special ids renumbered."""
    new = _pb().ModelProto()
    new.CopyFrom(m)
    del new.pieces[:]
    new.pieces.extend(m.pieces[i] for i in kept)
    remap = {old: n for n, old in enumerate(kept)}
    ts = new.trainer_spec
    for field in ("unk_id", "bos_id", "eos_id", "pad_id"):
        old = getattr(ts, field)
        if old >= 0:
            if old not in remap:
                raise PruneError(f"SentencePiece {field} {old} is not kept")
            setattr(ts, field, remap[old])
    ts.vocab_size = len(kept)
    return new


def write_pruned_proto(m, kept: Sequence[int], path: Path):
    """Write the pruned model (checked by loading it back with sentencepiece); return the proto."""
    import sentencepiece as spm

    new = pruned_proto(m, kept)
    blob = new.SerializeToString()
    sp = spm.SentencePieceProcessor(model_proto=blob)
    if sp.get_piece_size() != len(kept):
        raise PruneError(f"pruned SentencePiece model has {sp.get_piece_size()} pieces, expected {len(kept)}")
    Path(path).write_bytes(blob)
    return new
