"""SentencePiece vocabulary pruning on models trained inside the test (unigram and BPE, byte fallback)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from megatron.prune.errors import PruneError
from megatron.prune.text import builtin_text
from megatron.prune.vocab import TokenCounts, closure, count_tokens, minimum_keep, open_tokenizer, prune_tokenizer

UNICODE = [
    "naïve café, Ærøskøbing, Dvořák, São Paulo, Łódź",
    "日本語のテキストと中文字符 한국어",
    "emoji 😀🚀🧪 and flags 🇫🇷, zwj 👩‍💻",
    "math ∀x∈ℝ: x² ≥ 0; tab\tand\u00a0nbsp",
]


def _lines() -> list[str]:
    return [l for l in builtin_text("calib").split("\n") if l.strip()]


def _train(folder: Path, model_type: str, byte_fallback: bool = True, vocab: int = 3000) -> Path:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_lines()), model_writer=buf, vocab_size=vocab, model_type=model_type,
        byte_fallback=byte_fallback, normalization_rule_name="identity", remove_extra_whitespaces=False,
        minloglevel=2, num_threads=2, user_defined_symbols=["<tool>"],
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    return folder


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def spm_case(request, tmp_path_factory):
    """(source folder, pruned folder, kept ids, counted docs) for one SentencePiece model type."""
    root = tmp_path_factory.mktemp(f"spm_{request.param}")
    src = _train(root / "src", request.param)
    docs = _lines()[::20]  # the in-domain text: exactly what was counted
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    rules = open_tokenizer(src).rules
    counts = count_tokens(src, [data], rules, workers=1, progress=False)
    counts.save(root / "counts.json")
    needed = closure([i for i, c in enumerate(counts.counts) if c] + list(rules.required), rules)
    keep = len(needed) + 60
    assert keep < rules.size  # the prune must really drop pieces
    kept = prune_tokenizer(src, root / "out", keep=keep, counts=TokenCounts.load(root / "counts.json"))
    return src, root / "out", kept, docs


def _sp(folder: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


def test_in_domain_text_keeps_its_pieces(spm_case):
    src, out, kept, docs = spm_case
    a, b = _sp(src), _sp(out)
    assert b.get_piece_size() == len(kept) < a.get_piece_size()
    new_id = {old: new for new, old in enumerate(kept)}
    for doc in docs:
        old_ids = a.encode(doc)
        assert b.encode(doc, out_type=str) == a.encode(doc, out_type=str)
        assert b.encode(doc) == [new_id[i] for i in old_ids]


def test_any_unicode_round_trips(spm_case):
    src, out, kept, _ = spm_case
    b = _sp(out)
    held_out = builtin_text("eval")[:4000]
    for text in UNICODE + [held_out]:
        ids = b.encode(text)
        assert b.unk_id() not in ids
        assert b.decode(ids) == text
    # the CJK line needs byte fallback: its characters are not pieces of an English-trained model
    assert any(p.startswith("<0x") for p in b.encode(UNICODE[1], out_type=str))


def test_specials_and_bytes_kept_with_their_types(spm_case):
    from sentencepiece import sentencepiece_model_pb2 as pb

    src, out, kept, _ = spm_case
    m = pb.ModelProto()
    m.ParseFromString((out / "tokenizer.model").read_bytes())
    P = pb.ModelProto.SentencePiece
    types = [p.type for p in m.pieces]
    assert types.count(P.BYTE) == 256
    assert [p.piece for p in m.pieces[:3]] == ["<unk>", "<s>", "</s>"]
    assert "<tool>" in [p.piece for p in m.pieces]
    assert m.trainer_spec.vocab_size == len(kept)
    sp = _sp(out)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)


def _no_dummy_prefix(folder: Path):
    """The folder's model with ``add_dummy_prefix`` off, so a piece's own text is encoded as is."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString((folder / "tokenizer.model").read_bytes())
    m.normalizer_spec.add_dummy_prefix = False
    return m, spm.SentencePieceProcessor(model_proto=m.SerializeToString())


def test_bpe_kept_pieces_stay_reachable(tmp_path):
    """Every kept BPE piece is still produced from its own text (its merge path survived the prune)."""
    src = _train(tmp_path / "src", "bpe")
    rules = open_tokenizer(src).rules
    wanted = list(range(1000, rules.size, 7))  # scattered late merges: their intermediates must be pulled in
    kept = prune_tokenizer(src, tmp_path / "out", keep_ids=wanted)
    assert len(kept) > len(set(wanted) | rules.required)
    _, a = _no_dummy_prefix(src)
    m, b = _no_dummy_prefix(tmp_path / "out")
    from sentencepiece import sentencepiece_model_pb2 as pb

    normal = [p.piece for p in m.pieces if p.type == pb.ModelProto.SentencePiece.NORMAL and len(p.piece) > 1]
    checked = 0
    for piece in normal:
        if a.encode(piece, out_type=str) == [piece]:
            assert b.encode(piece, out_type=str) == [piece], piece
            checked += 1
    assert checked > 150


def test_without_byte_fallback_unk_is_the_fallback(tmp_path):
    src = _train(tmp_path / "src", "unigram", byte_fallback=False)
    rules = open_tokenizer(src).rules
    assert not any(t.startswith("<0x") for t in rules.tokens)
    assert minimum_keep(rules) == 4  # <unk>, <s>, </s>, <tool>
    prune_tokenizer(src, tmp_path / "out", keep=300)
    b = _sp(tmp_path / "out")
    assert b.get_piece_size() == 300
    assert b.unk_id() in b.encode(UNICODE[1])


def test_bad_inputs(tmp_path):
    src = _train(tmp_path / "src", "unigram")
    rules = open_tokenizer(src).rules
    floor = minimum_keep(rules)
    with pytest.raises(PruneError, match=f"at least {floor} tokens"):
        prune_tokenizer(src, tmp_path / "a", keep=floor - 1)
    with pytest.raises(PruneError, match=r"token id 3000 is out of range \[0, 3000\)"):
        prune_tokenizer(src, tmp_path / "b", keep_ids=[5, 3000])
    with pytest.raises(PruneError, match="token id -1"):
        prune_tokenizer(src, tmp_path / "c", keep_ids=[-1])
    other = _train(tmp_path / "other", "unigram", vocab=2800)
    counts = count_tokens(other, [_write(tmp_path / "d.txt", "hello world")], open_tokenizer(other).rules,
                          workers=1, progress=False)
    with pytest.raises(PruneError, match="different tokenizer"):
        prune_tokenizer(src, tmp_path / "d", keep=600, counts=counts)
    for name in "abcd":
        assert not (tmp_path / name).exists()  # nothing written on a refused run


def test_keep_ids_are_completed_with_the_always_kept_set(tmp_path):
    src = _train(tmp_path / "src", "unigram")
    rules = open_tokenizer(src).rules
    want = [rules.tokens.index(p) for p in ("▁the", "▁is", "s")]
    kept = prune_tokenizer(src, tmp_path / "out", keep_ids=want)
    assert set(want) <= set(kept) and rules.required <= set(kept)
    assert len(kept) == len(rules.required | set(want))
    assert _sp(tmp_path / "out").encode("the is", out_type=str) == ["▁the", "▁is"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
