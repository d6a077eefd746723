"""BPE (tokenizer.json) vocabulary pruning: merge re-derivation, in-domain identity, lossless round trips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from megatron.prune.cli import main as cli_main
from megatron.prune.errors import PruneError
from megatron.prune.text import builtin_text
from megatron.prune.vocab import TokenCounts, count_tokens, minimum_keep, open_tokenizer, prune_tokenizer
from tiny_corpus import SPECIALS, calib_docs, make_bytelevel_tokenizer, needed_for, write_docs

UNICODE = [
    "naïve café, Ærøskøbing, Dvořák, São Paulo, Łódź",
    "日本語のテキストと中文字符 한국어",
    "emoji 😀🚀🧪 and flags 🇫🇷, zwj 👩‍💻",
    "math ∀x∈ℝ: x² ≥ 0;\ttabs,\u00a0nbsp, \r\n crlf and   runs of    spaces",
]


def _tok(folder: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def check_pruned(src: Path, out: Path, kept: tuple[int, ...], docs: list[str]) -> None:
    """In-domain text: identical token strings, ids remapped; any text: lossless; AutoTokenizer loads it."""
    from transformers import AutoTokenizer

    a, b = _tok(src), _tok(out)
    new_id = {old: new for new, old in enumerate(kept)}
    for ea, eb in zip(a.encode_batch(docs, add_special_tokens=False), b.encode_batch(docs, add_special_tokens=False)):
        assert eb.tokens == ea.tokens
        assert eb.ids == [new_id[i] for i in ea.ids]
    for text in UNICODE + [builtin_text("eval")[:20000]]:
        ids = b.encode(text, add_special_tokens=False).ids
        assert b.decode(ids, skip_special_tokens=False) == text
    hf = AutoTokenizer.from_pretrained(str(out))
    assert len(hf) == len(kept)
    assert hf.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [new_id[a.token_to_id(t)] for t in SPECIALS[1:]]
    assert hf.decode(hf("héllo 😀 world")["input_ids"]) == "héllo 😀 world"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return make_bytelevel_tokenizer(tmp_path_factory.mktemp("bbpe") / "tok")


def test_trained_bytelevel_prune_by_counts(trained, tmp_path):
    docs = calib_docs()[::25]
    counts = count_tokens(trained, [write_docs(tmp_path / "d.jsonl", docs)], open_tokenizer(trained).rules,
                          workers=2, progress=False)
    keep = len(needed_for(trained, counts)) + 50
    assert keep < 2500
    kept = prune_tokenizer(trained, tmp_path / "out", keep=keep, counts=counts)
    assert len(kept) == keep
    check_pruned(trained, tmp_path / "out", kept, docs)


def test_merges_rederived(trained, tmp_path):
    """Scattered kept ids pull in their merge operands; every surviving merge joins kept tokens into a kept one."""
    rules = open_tokenizer(trained).rules
    wanted = list(range(1500, rules.size, 11))
    kept = prune_tokenizer(trained, tmp_path / "out", keep_ids=wanted)
    assert len(kept) > len(set(wanted) | rules.required)
    data = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(len(kept)))
    produced = set()
    for a, b in data["model"]["merges"]:
        assert a in vocab and b in vocab and a + b in vocab
        produced.add(a + b)
    from tokenizers import pre_tokenizers

    base = set(pre_tokenizers.ByteLevel.alphabet()) | set(SPECIALS)
    assert {t for t in vocab if t not in base} == produced  # every kept token is reachable by a merge
    a, b = _tok(trained), _tok(tmp_path / "out")
    checked = 0
    for i in wanted:
        text = a.decode([i])
        if a.encode(text, add_special_tokens=False).tokens == [rules.tokens[i]]:  # skips partial UTF-8 tokens
            assert b.encode(text, add_special_tokens=False).tokens == [rules.tokens[i]]
            checked += 1
    assert checked > 100


def test_intermediate_tokens_are_pulled_in(tmp_path):
    """Keeping 'abc' (built as ab + c) keeps 'ab' too, otherwise 'abc' could never form."""
    from tokenizers import Tokenizer, models

    vocab = {"a": 0, "b": 1, "c": 2, "d": 3, "ab": 4, "cd": 5, "abc": 6, "abcd": 7, "<unk>": 8}
    merges = [("a", "b"), ("c", "d"), ("ab", "c"), ("abc", "d")]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    (tmp_path / "src").mkdir()
    data = json.loads(tok.to_str())
    data["model"]["vocab"].update({f"<0x{i:02X}>": 9 + i for i in range(256)})
    (tmp_path / "src" / "tokenizer.json").write_text(json.dumps(data))
    rules = open_tokenizer(tmp_path / "src").rules
    assert rules.kind == "BPE with byte fallback" and minimum_keep(rules) == 257
    kept = prune_tokenizer(tmp_path / "src", tmp_path / "out", keep_ids=[6], verify=False)
    assert [rules.tokens[i] for i in kept if i < 9] == ["a", "b", "c", "ab", "abc", "<unk>"]
    b = _tok(tmp_path / "out")
    assert b.encode("abcab").tokens == ["abc", "ab"]
    assert b.encode("abcd").tokens == ["abc", "<0x64>"]  # 'd' fell back to its byte
    # a budget of 258 fits 'ab' (the most frequent) but not 'abc', which would need 'c' and 'ab' besides
    counts = TokenCounts(rules.kind, rules.size, rules.vocab_hash, (0, 0, 0, 0, 0, 0, 9, 0) + (0,) * 257)
    kept = prune_tokenizer(tmp_path / "src", tmp_path / "o2", keep=258, counts=counts, verify=False)
    assert [rules.tokens[i] for i in kept if i < 9] == ["a", "<unk>"]
    assert len(kept) == 258 and 6 not in kept


def test_unsupported_and_mismatched(trained, tmp_path):
    from tokenizers import Tokenizer, models

    wp = tmp_path / "wordpiece"
    wp.mkdir()
    Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(wp / "tokenizer.json"))
    with pytest.raises(PruneError, match="unsupported tokenizer type 'WordPiece'"):
        open_tokenizer(wp)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "vocab.txt").write_text("a\n")
    with pytest.raises(PruneError, match=r"no supported tokenizer .*found: vocab.txt"):
        open_tokenizer(empty)
    other = make_bytelevel_tokenizer(tmp_path / "other", vocab=2900)
    counts = count_tokens(other, [write_docs(tmp_path / "d.jsonl", ["hello"])], open_tokenizer(other).rules,
                          workers=1, progress=False)
    with pytest.raises(PruneError, match=r"different tokenizer .*2900 tokens.*3000 tokens"):
        prune_tokenizer(trained, tmp_path / "x", keep=1000, counts=counts)
    with pytest.raises(PruneError, match="at least 259 tokens"):
        prune_tokenizer(trained, tmp_path / "y", keep=200)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_count_then_prune(trained, tmp_path, capsys):
    docs = calib_docs()[::6]
    txt = tmp_path / "part.txt"
    txt.write_text("\n\n".join(docs[: len(docs) // 2]))
    jl = write_docs(tmp_path / "rest.jsonl", docs[len(docs) // 2:])
    assert cli_main(["vocab", "count", "--tokenizer", str(trained), "--data", str(txt), str(jl),
                     "--output", str(tmp_path / "c.json"), "--workers", "2", "--no-progress"]) == 0
    counts = TokenCounts.load(tmp_path / "c.json")
    direct = count_tokens(trained, [txt, jl], open_tokenizer(trained).rules, workers=1, progress=False)
    assert counts.counts == direct.counts and counts.num_tokens > 10000
    assert cli_main(["vocab", "prune", "--input", str(trained), "--output", str(tmp_path / "o"),
                     "--keep", "1800", "--counts", str(tmp_path / "c.json")]) == 0
    assert len(_tok(tmp_path / "o").get_vocab()) == 1800
    (tmp_path / "ids.txt").write_text("5 6, 7\n3000")
    assert cli_main(["vocab", "prune", "--input", str(trained), "--output", str(tmp_path / "o2"),
                     "--keep-ids", str(tmp_path / "ids.txt")]) == 2
    assert "token id 3000 is out of range [0, 3000)" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "no text field"}\n')
    assert cli_main(["vocab", "count", "--tokenizer", str(trained), "--data", str(bad),
                     "--output", str(tmp_path / "c2.json"), "--workers", "1"]) == 2
    assert "bad.jsonl:1: not a JSON object with a 'text' field (fields: 'txt')" in capsys.readouterr().err
    assert not (tmp_path / "c2.json").exists()
    # the same formats as `megatron-prune data`: gzipped JSON lines under another suffix count the same tokens
    import gzip

    gz = tmp_path / "rest.NDJSON.gz"
    gz.write_bytes(gzip.compress(jl.read_bytes()))
    assert count_tokens(trained, [txt, gz], open_tokenizer(trained).rules, workers=1, progress=False).counts == \
        direct.counts


@pytest.mark.slow
def test_smollm2_tokenizer_to_8k(real_model, tmp_path):
    """The real 49152-token SmolLM2 tokenizer, pruned to 8000 by counts on the built-in text."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (real_model / name).is_file():
            shutil.copy(real_model / name, src / name)
    rules = open_tokenizer(src).rules
    assert (rules.kind, rules.size) == ("byte-level BPE", 49152)
    docs = calib_docs()
    counts = count_tokens(src, [write_docs(tmp_path / "d.jsonl", docs)], rules, workers=2, progress=False)
    assert len(needed_for(src, counts)) < 8000
    kept = prune_tokenizer(src, tmp_path / "out", keep=8000, counts=counts)
    assert len(kept) == 8000
    check_pruned(src, tmp_path / "out", kept, docs)
