"""``megatron-prune data``: documents read back from .bin/.idx equal tokenizer output + EOD."""

from __future__ import annotations

import gzip
import json
import multiprocessing.pool
import subprocess
import sys

import numpy as np
import pytest

from megatron.prune.cli import main
from megatron.prune.data import (
    TextTokenizer,
    dataset_paths,
    json_document,
    preprocess,
    read_documents,
    resolve_input_format,
    split_paragraphs,
    validate_dataset_prefix,
)
from megatron.prune.errors import PruneError
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


def test_empty_json_documents_are_skipped_as_blank_lines_are(tmp_path, hf_tok):
    """A JSON line whose text is empty or only whitespace is no document (as blank lines in plain text are not):
    it was written as an end-of-document token alone."""
    docs = pydoc_documents(3)
    src = write_jsonl(tmp_path / "in.jsonl", [docs[0], "", docs[1], " \n\t", docs[2]])
    s = preprocess(src, tmp_path / "out", hf_tok, progress=False)
    tok = TextTokenizer(hf_tok)
    assert _read_back(str(tmp_path / "out_text_document")) == [tok.encode(d) + [tok.info.eod_id] for d in docs]
    assert s.documents == 3


def test_plain_text_and_sentencepiece_via_script(tmp_path):
    spm_model = make_spm_tokenizer(tmp_path / "spm")
    docs = ["First document,\nwith two lines.", "Second one.", "Third: the end."]
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(docs) + "\n\n\n")
    run = subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", str(src), "--output-prefix",
         str(tmp_path / "p"), "--tokenizer", str(spm_model), "--no-progress"],
        capture_output=True, text=True, check=True,
    )
    out = run.stdout
    assert "format: text" in out
    # megatron-core's import-time no-CUDA/TE/Apex warnings are silenced (only during that import)
    assert "Transformer Engine" not in run.stderr and "No CUDA runtime" not in run.stderr, run.stderr
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


def _cli(tmp_path, hf_tok, *extra: str, prefix: str = "o") -> list[str]:
    return ["data", "--output-prefix", str(tmp_path / prefix), "--tokenizer", str(hf_tok), "--no-progress", *extra]


@pytest.mark.parametrize("name", ["small.ndjson", "SMALL.JSONL", "corpus.Json", "no_suffix", "data.dump"])
def test_json_lines_recognised_by_any_case_suffix_or_content(tmp_path, name):
    docs = ["first {doc}", "second\nwith a newline"]
    src = write_jsonl(tmp_path / name, docs)
    assert resolve_input_format(src) == "jsonl"
    assert list(read_documents(src)) == docs  # not the JSON syntax read as plain text
    as_text = "\n".join(json.dumps({"text": d}) for d in docs)
    assert list(read_documents(src, "text")) == [as_text]  # --input-format text overrides


@pytest.mark.parametrize("name", ["notes.TXT", "notes.Md", "notes.text", "no_suffix"])
def test_plain_text_recognised_by_suffix_or_content(tmp_path, name):
    src = tmp_path / name
    src.write_text('{"text": "a JSON-looking line"}\n\nsecond document\n' if "." in name else "plain\n\nwords\n")
    assert resolve_input_format(src) == "text"
    assert resolve_input_format(src, "jsonl") == "jsonl"


def test_format_is_printed_and_overridable(tmp_path, hf_tok, capsys):
    src = tmp_path / "corpus"  # no suffix, JSON lines content: sniffed
    write_jsonl(src, ["one doc", "two doc"])
    assert main(_cli(tmp_path, hf_tok, "--input", str(src))) == 0
    out = capsys.readouterr().out
    assert "format: jsonl" in out and "documents: 2" in out
    assert main(_cli(tmp_path, hf_tok, "--input", str(src), "--input-format", "text", prefix="t")) == 0
    out = capsys.readouterr().out
    assert "format: text" in out and "documents: 1" in out


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_not_utf8_is_reported_with_line_and_column(tmp_path, hf_tok, capsys, workers, suffix):
    lines = [json.dumps({"text": f"doc {i}"}).encode() if suffix == ".jsonl" else f"doc {i}".encode() * (i % 2)
             for i in range(60)]  # plain text: one-line documents between blank lines
    lines[39] = b'{"text": "caf\xe9"}' if suffix == ".jsonl" else b"caf\xe9 au lait"
    src = tmp_path / f"latin1{suffix}"
    src.write_bytes(b"\n".join(lines) + b"\n")
    assert main(_cli(tmp_path, hf_tok, "--input", str(src), "--workers", str(workers))) == 2
    column = 14 if suffix == ".jsonl" else 4
    assert f"latin1{suffix}:40: not UTF-8 (byte 0xe9 at column {column})" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]  # no output, no temp files


def test_bom_and_gzip_are_read(tmp_path):
    docs = ["ünïcode first", "second"]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
    assert list(read_documents(bom)) == docs
    bom_text = tmp_path / "bom.txt"
    bom_text.write_bytes("\ufeffHello\r\nworld\r\n\r\nBye\r\n".encode())
    assert list(read_documents(bom_text)) == ["Hello\nworld", "Bye"]
    gz = tmp_path / "corpus.JSONL.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert resolve_input_format(gz) == "jsonl" and list(read_documents(gz)) == docs
    sniffed = tmp_path / "corpus.gz"  # no format suffix under .gz: sniffed from the decompressed text
    sniffed.write_bytes(gz.read_bytes())
    assert resolve_input_format(sniffed) == "jsonl"
    not_gz = tmp_path / "plain.txt.gz"
    not_gz.write_text("not gzipped\n")
    with pytest.raises(PruneError, match="not a readable gzip file"):
        list(read_documents(not_gz))


@pytest.mark.parametrize("line, message", [
    ('{"text": "unterminated', r"bad.jsonl:2: not valid JSON \(Unterminated string starting at: column 10\)"),
    ('["a", "list"]', "bad.jsonl:2: a JSON array, expected one object per line"),
    ('"just a string"', "bad.jsonl:2: a JSON string, expected an object with a 'text' field"),
    ('{"body": "x"}', r"bad.jsonl:2: not a JSON object with a 'text' field \(fields: 'body'\)"),
    ('{"text": 3}', "bad.jsonl:2: 'text' is a JSON number, not a string"),
])
def test_json_errors_say_what_is_wrong(tmp_path, line, message):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(PruneError, match=message):
        list(read_documents(src))


def test_overwrite_interrupted_between_renames_leaves_no_mismatched_pair(tmp_path, hf_tok, monkeypatch):
    """--overwrite renames .bin and .idx one after the other: stopped in between, the old .idx must not stay beside
    the new .bin (Megatron would read the new tokens through the old index)."""
    import os

    old = preprocess(write_jsonl(tmp_path / "a.jsonl", ["old text"] * 3), tmp_path / "out", hf_tok, progress=False)
    real = os.replace

    def stop_before_idx(src, dst):
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", stop_before_idx)
    with pytest.raises(KeyboardInterrupt):
        preprocess(write_jsonl(tmp_path / "b.jsonl", pydoc_documents(5)), tmp_path / "out", hf_tok, overwrite=True,
                   progress=False)
    assert old.bin_path.is_file() and not old.idx_path.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]  # no temp files either


def test_worker_error_terminates_the_pool_and_removes_temp_files(tmp_path, hf_tok, monkeypatch):
    calls: list[str] = []
    for name in ("terminate", "close"):
        real = getattr(multiprocessing.pool.Pool, name)
        monkeypatch.setattr(multiprocessing.pool.Pool, name,
                            lambda self, _real=real, _name=name: (calls.append(_name), _real(self))[1])
    docs = [f"document {i}" for i in range(2000)]
    docs[40] = "lone surrogate \ud800"  # valid JSON, but not text: no tokenizer can encode it
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    with pytest.raises(PruneError, match=r"in\.jsonl:41: 'text' holds an unpaired UTF-16 surrogate \('\\ud800', "
                                         r"from a \\ud800 escape\)"):
        preprocess(src, tmp_path / "out", hf_tok, workers=2, progress=False)
    assert calls == ["terminate"]  # not close()+join(), which tokenizes every queued document first
    assert json_document('{"text": "\\ud83d\\ude00"}', "text", "f:1") == "\U0001f600"  # a pair is one character
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no output, no temp files


def test_megatron_lm_flags(tmp_path, hf_tok, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": "ignored", "body": f"body {i}"}) + "\n" for i in range(3)))
    argv = ["data", "--input", str(src), "--output-prefix", str(tmp_path / "m"), "--tokenizer-model", str(hf_tok),
            "--tokenizer-type", "HuggingFaceTokenizer", "--json-keys", "body", "--append-eod", "--keep-newlines",
            "--log-interval", "100", "--dataset-impl", "mmap", "--workers", "1", "--no-progress"]
    assert main(argv) == 0
    assert "dataset prefix: " + str(tmp_path / "m_body_document") in capsys.readouterr().out
    tok = TextTokenizer(hf_tok)
    assert _read_back(str(tmp_path / "m_body_document")) == [tok.encode_document(f"body {i}") for i in range(3)]
    assert dataset_paths(tmp_path / "m")[0].name == "m_text_document.bin"  # the default key keeps its name

    refused = [
        (["--tokenizer-type", "SentencePieceTokenizer"], "needs a SentencePiece .model file, but --tokenizer"),
        (["--json-keys", "text", "title"], "one key per run"),
        (["--input-format", "text", "--json-keys", "body"], "read as plain text"),
    ]
    for extra, message in refused:
        assert main(_cli(tmp_path, hf_tok, "--input", str(src), *extra)) == 2
        assert message in capsys.readouterr().err
    parse_errors = [
        (["--split-sentences"], "--split-sentences is not supported: documents are tokenized whole"),
        (["--partitions", "4"], "--partitions is not supported: use --workers"),
        (["--dataset-impl", "lazy"], "invalid choice: 'lazy'"),
    ]
    for extra, message in parse_errors:
        with pytest.raises(SystemExit) as e:
            main(_cli(tmp_path, hf_tok, "--input", str(src), *extra))
        err = capsys.readouterr().err
        assert e.value.code == 2 and "usage: megatron-prune data" in err and message in err
    assert not list(tmp_path.glob("o_*"))


def test_folder_input_and_folder_prefix_are_refused(tmp_path, hf_tok, capsys):
    good = write_jsonl(tmp_path / "in.jsonl", ["a b c"])
    (tmp_path / "out").mkdir()
    assert main(_cli(tmp_path, hf_tok, "--input", str(tmp_path))) == 2
    assert "is a folder; pass a file" in capsys.readouterr().err
    for prefix in (f"{tmp_path / 'out'}/", str(tmp_path / "out")):
        assert main(["data", "--input", str(good), "--output-prefix", prefix, "--tokenizer", str(hf_tok)]) == 2
        assert f"pass e.g. --output-prefix {tmp_path / 'out' / 'corpus'}" in capsys.readouterr().err
    assert not list((tmp_path / "out").iterdir())


def test_split_paragraphs_keeps_trailing_spaces():
    # Only the newline is stripped from each line (as its docstring says); blank lines separate documents.
    assert list(split_paragraphs(["a  \n", "b\t\n", " \n", "c\n"])) == ["a  \nb\t", "c"]


def test_help_describes_inputs_outputs_and_megatron_flags(capsys):
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for phrase in ("one file (not a folder, several files or a glob)", "UTF-8", ".gz", ".ndjson",
                   "PREFIX_KEY_document", "--tokenizer-model", "--append-eod", "Refused: --split-sentences"):
        assert phrase in out, phrase
