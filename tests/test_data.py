"""``megatron-prune data``: documents read back from .bin/.idx equal tokenizer output + EOD."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from megatron.prune.cli import main
from megatron.prune.data import TextTokenizer, dataset_paths, preprocess, validate_dataset_prefix
from megatron.prune.shape import PruneError
from tests.tiny_corpus import make_hf_tokenizer, make_spm_tokenizer, pydoc_documents, write_ids, write_jsonl


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    return make_hf_tokenizer(tmp_path_factory.mktemp("tok"))


def _read_back(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.mark.parametrize("workers", [1, 2])
def test_jsonl_round_trip(tmp_path, hf_tok, workers):
    docs = pydoc_documents(25)
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    s = preprocess(src, tmp_path / "out", hf_tok, workers=workers, progress=False)
    tok = TextTokenizer(hf_tok)
    expected = [tok.encode(d) + [tok.info.eod_id] for d in docs]
    assert _read_back(str(tmp_path / "out_text_document")) == expected
    assert (s.documents, s.tokens) == (25, sum(map(len, expected)))
    assert tok.info.eod_id == 1 and expected[0][-1] == 1 and 1 not in expected[0][:-1]
    # the HF tokenizer itself agrees (no BOS added, EOD only at the end)
    from transformers import AutoTokenizer

    assert expected[3][:-1] == AutoTokenizer.from_pretrained(hf_tok)(docs[3])["input_ids"]


def test_plain_text_and_sentencepiece_via_script(tmp_path):
    spm_model = make_spm_tokenizer(tmp_path / "spm")
    docs = ["First document,\nwith two lines.", "Second one.", "Third: the end."]
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(docs) + "\n\n\n")
    out = subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", str(src), "--output-prefix",
         str(tmp_path / "p"), "--tokenizer", str(spm_model), "--no-progress"],
        capture_output=True, text=True, check=True,
    ).stdout
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    expected = [list(sp.encode(d)) + [sp.eos_id()] for d in docs]
    assert _read_back(str(tmp_path / "p_text_document")) == expected
    assert f"tokens: {sum(map(len, expected))}" in out and "documents: 3" in out
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert IndexedDataset(str(tmp_path / "p_text_document")).index.dtype == np.uint16


def test_bad_inputs_fail_before_output(tmp_path, hf_tok, capsys):
    good = write_jsonl(tmp_path / "in.jsonl", ["a b c"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    cases = [
        (["--input", str(tmp_path / "nope.jsonl")], "no such file"),
        (["--input", str(bad)], "bad.jsonl:2"),
        (["--input", str(good), "--tokenizer", str(tmp_path / "missing")], "tokenizer"),
        (["--input", str(good), "--workers", "0"], "--workers 0"),
        (["--input", str(good), "--output-prefix", str(tmp_path / "no" / "dir")], "does not exist"),
    ]
    for extra, message in cases:
        argv = ["data", "--output-prefix", str(tmp_path / "o"), "--tokenizer", str(hf_tok), *extra]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
        assert not any(p.exists() for p in dataset_paths(tmp_path / "o"))
    assert main(["data", "--input", str(good), "--output-prefix", str(tmp_path / "o"),
                 "--tokenizer", str(hf_tok), "--no-progress"]) == 0
    assert main(["data", "--input", str(good), "--output-prefix", str(tmp_path / "o"),
                 "--tokenizer", str(hf_tok)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    validate_dataset_prefix(str(tmp_path / "o_text_document"))
    with pytest.raises(PruneError, match="did you mean"):
        validate_dataset_prefix(str(tmp_path / "o"))


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_token_id_check_exact_and_sampled(tmp_path, dtype):
    from megatron.prune.data import check_token_ids, max_token_id, token_dtype

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=n) for n in (500, 70_000, 3)]
    docs[1][12_345] = 1500  # one foreign id: found by the exact scan, and only by it
    prefix = write_ids(tmp_path / "d", docs, dtype)
    assert token_dtype(prefix) == np.dtype(dtype)
    assert max_token_id(prefix) == (1500, True)
    check_token_ids(prefix, 1501)
    with pytest.raises(PruneError, match="token id 1500 is outside the tokenizer's vocabulary of 1500"):
        check_token_ids(prefix, 1500)
    budget = 4 * 256 * np.dtype(dtype).itemsize  # 4 blocks of 256 ids: the lone 1500 is missed, the rest seen
    top, exact = max_token_id(prefix, budget, blocks=4)
    assert not exact and 990 <= top < 1000
    foreign = write_ids(tmp_path / "f", [rng.integers(0, 5000, size=100_000)], dtype)  # another tokenizer's ids
    with pytest.raises(PruneError, match=r"token id 4\d{3} \(in a sample of the file\) is outside .* of 1000"):
        check_token_ids(foreign, 1000, budget, blocks=4)
