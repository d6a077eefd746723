"""The seed project's entry points, run as its README writes them (paths, flags, variables), each giving exactly the
output of the `megatron-prune` verb that does the work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.prune.core.plan import PrunePlan
from megatron.prune.formats.mcore import ops
from megatron.prune.vocab import TokenCounts, prune_hf_vocab
from tiny import logits
from tiny_corpus import calib_docs, make_bytelevel_tokenizer, model_with_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "emb_pruner" / script), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_seed_scripts_count_then_prune_in_place(tmp_path):
    tok = make_bytelevel_tokenizer(tmp_path / "tok")
    model = model_with_tokenizer(tmp_path / "model", "llama-gqa", tok)
    reference = tmp_path / "ref_src"
    model_with_tokenizer(reference, "llama-gqa", tok)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(calib_docs()[::25]))
    r = run("get_vocab_freq.py", "--data_type", "txt", "--data_path", str(corpus), "--spm", str(tok / "tokenizer.json"),
            "--vocab_freq", str(tmp_path / "freq"), "--remain_vocab_size", "1700",
            "--remain_vocab_ids_path", str(tmp_path / "ids.pt"), "--workers", "1")
    assert r.returncode == 0, r.stderr
    ids = torch.load(tmp_path / "ids.pt")
    assert len(ids) == 1700
    counts = TokenCounts.load(tmp_path / "freq.json")
    first = (tmp_path / "freq.txt").read_text().split("\n", 1)[0].split()
    assert int(first[1]) == max(counts.counts) and counts.counts[int(first[0])] == max(counts.counts)

    r = run("prune_spm_and_emb.py", "--hf_dir", str(model), "--remain_vocab_path", str(tmp_path / "ids.pt"),
            "--remain_ids_with_spt", str(tmp_path / "final.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "final.json").read_text()) == sorted(ids)
    assert json.loads((model / "config.json").read_text())["vocab_size"] == 1700
    # same result as the library on an identical source
    plan = prune_hf_vocab(reference, tmp_path / "ref_out", keep_ids=ids, progress=False)
    x = torch.tensor([[5, 9, 300, 17]])
    assert torch.equal(logits(model, x), logits(tmp_path / "ref_out", x))
    assert list(plan.vocab) == sorted(ids)
    assert not list(tmp_path.glob(".model.*"))  # no leftover temporary folders

    r = run("prune_spm_and_emb.py", "--hf_dir", str(model), "--remain_vocab_path", str(tmp_path / "missing.pt"))
    assert r.returncode == 2 and "missing.pt does not exist" in r.stderr
    r = run("get_vocab_freq.py", "--data_path", str(corpus), "--spm", str(tok), "--remain_vocab_size", "1",
            "--remain_vocab_ids_path", str(tmp_path / "x.pt"))
    assert r.returncode == 2 and r.stderr.startswith("get_vocab_freq.py: error: --remain_vocab_size 1 is outside")


def test_seed_compatible_hf_entry_point(tiny_hf, tmp_path):
    import json
    from pathlib import Path

    from megatron.prune.core.plan import PrunePlan

    cfg = tmp_path / "target.json"
    cfg.write_text(json.dumps({"intermediate_size": 32, "num_hidden_layers": 3, "num_key_value_heads": 2,
                               "num_attention_heads": 4, "hidden_size": 40}))
    script = Path(__file__).parent.parent / "prune_hf" / "prune_llama.py"
    r = subprocess.run([sys.executable, str(script), "--model_name_or_path", str(tiny_hf("llama-gqa")),
                        "--prune_config_path", str(cfg), "--output_path", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    t = PrunePlan.load(tmp_path / "out").target
    assert (t.ffn_hidden_size, t.num_layers, t.num_query_groups, t.num_attention_heads, t.hidden_size) == (
        32, 3, 2, 4, 40)


# ---- the seed's commands, as its README writes them, against the verbs ----------------------------------------------

SEED_GPT_ARGS = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "1", "--sequence-parallel",
                 "--num-layers", "4", "--hidden-size", "48", "--kv-channels", "8", "--num-attention-heads", "8",
                 "--seq-length", "4096", "--max-position-embeddings", "4096", "--micro-batch-size", "2",
                 "--global-batch-size", "64", "--lr", "2.5e-5", "--train-iters", "4800", "--lr-decay-style", "cosine",
                 "--fp16", "--use-checkpoint-args", "--no-load-optim", "--untie-embeddings-and-output-weights",
                 "--normalization", "RMSNorm", "--no-masked-softmax-fusion", "--tokenizer-type",
                 "GPTSentencePieceTokenizer", "--split", "949,50,1", "--log-interval", "1", "--save-interval", "100",
                 "--is_prune", "--distributed-backend", "nccl", "--tensorboard-dir", "tb"]


def seed_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOAD", "SAVE", "HF", "MG", "TP", "PP")}
    return dict(env, PYTHON=sys.executable, PYTHONPATH=str(ROOT), **variables)


def sh(argv: list[str], cwd: Path = ROOT, **variables: str) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, cwd=cwd, env=seed_env(**variables), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def verb(*argv: str) -> None:
    from megatron.prune.cli import main

    assert main(list(argv)) == 0


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def untimed(files: dict[str, bytes]) -> dict[str, bytes]:
    """``files`` with the refit's wall time taken out of each prune_plan.json (the one entry two runs differ in)."""
    out = dict(files)
    for name, data in files.items():
        if Path(name).name == "prune_plan.json":
            plan = json.loads(data)
            assert plan["info"]["reconstruct"].pop("seconds") >= 0
            out[name] = json.dumps(plan, sort_keys=True).encode()
    return out


def same_output(out: Path, seed, verb_run, refit: bool = False) -> None:
    """``seed()`` and ``verb_run()`` each write ``out`` (so paths recorded inside agree): the files are identical
    (after a refit, but for its wall time in the plan)."""
    seed()
    seed_out = out.with_name(out.name + "-seed")
    out.rename(seed_out)
    verb_run()
    a, b = files_of(seed_out), files_of(out)
    if refit:
        a, b = untimed(a), untimed(b)
    assert a is not b and len(a) >= 2 and a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_seed_hf_to_megatron_sh_is_convert(tiny_hf, tmp_path):
    """`bash tools/checkpoint_conversion/hf_to_megatron.sh` (the seed's path), with variables and with the seed's
    flags."""
    hf, out = tiny_hf("llama-gqa"), tmp_path / "mg"
    script = ["bash", "tools/checkpoint_conversion/hf_to_megatron.sh", "--no-progress"]
    same_output(out, lambda: sh(script, HF=str(hf), MG=str(out), TP="2"),
                lambda: verb("convert", "hf-to-megatron", "--input", str(hf), "--output", str(out), "--tp", "2",
                             "--no-progress"))
    shutil.rmtree(out)
    r = sh([*script, "--load_path", str(hf), "--save_path", str(out), "--target_tensor_model_parallel_size", "2",
            "--target_pipeline_model_parallel_size", "1", "--target_data_parallel_size", "16",
            "--target_params_dtype", "bf16", "--make_vocab_size_divisible_by", "128", "--print-checkpoint-structure",
            "--megatron-path", "/data/Megatron-LM-main"])
    assert files_of(out) == files_of(tmp_path / "mg-seed")
    assert "note: ignored --target_data_parallel_size 16" in r.stdout


def test_seed_prune_llama_sh_with_its_flags_and_gpt_args_is_prune(tiny_hf, tmp_path):
    """`bash scripts/prune_llama.sh --load X --save Y --hidden_size_remain ... --prune_type balance` followed by the
    seed's GPT_ARGS (checked against the checkpoint, training flags noted), and the same from variables."""
    mg = ops.hf_to_megatron(tiny_hf("llama-gqa"), tmp_path / "mg", tp=2, progress=False)
    out = tmp_path / "small"
    seed_flags = ["--load", str(mg), "--save", str(out), "--hidden_size_remain", "40", "--num_attention_heads_remain",
                  "4", "--ffn_hidden_size_remain", "32", "--drop_layers", "1,2", "--prune_type", "balance"]
    verb_flags = ["prune", "--input", str(mg), "--output", str(out), "--hidden-size", "40", "--num-attention-heads",
                  "4", "--ffn-hidden-size", "32", "--drop-layers", "1,2", "--prune-type", "balance"]
    holder = {}
    same_output(out, lambda: holder.setdefault("r", sh(["bash", "scripts/prune_llama.sh", *seed_flags,
                                                        *SEED_GPT_ARGS])),
                lambda: verb(*verb_flags, "--no-progress"))
    note = [line for line in holder["r"].stdout.splitlines() if "note: Megatron training flags ignored" in line]
    assert len(note) == 1 and "--fp16" in note[0] and "--num-layers" not in note[0]
    assert PrunePlan.load(out).info["prune_type"] == "balance"
    shutil.rmtree(out)
    sh(["bash", "scripts/prune_llama.sh"], LOAD=str(mg), SAVE=str(out), HIDDEN="40", HEADS="4", FFN="32",
       DROP="1 2", PRUNE_TYPE="balance")
    assert files_of(out) == files_of(tmp_path / "small-seed")


def test_seed_prune_llama_refits_as_prune_does(tmp_path):
    """On a checkpoint with a tokenizer the seed's prune_llama selects by activation and refits the kept weights by
    default, as `megatron-prune prune` does; --reconstruct none (or RECONSTRUCT=none) keeps the sliced weights, as
    the verb's --reconstruct none."""
    from megatron.prune.refit.run import RECONSTRUCT
    from megatron.prune.seed.prune import RECONSTRUCT as SEED_RECONSTRUCT
    from megatron.prune.seed.prune import prune_llama_argv, prune_llama_parser

    assert SEED_RECONSTRUCT == RECONSTRUCT
    model = model_with_tokenizer(tmp_path / "m", "llama-gqa", make_bytelevel_tokenizer(tmp_path / "tok", 600))
    mg = ops.hf_to_megatron(model, tmp_path / "mg", tp=2, progress=False)
    seed_flags = ["--load", str(mg), "--hidden_size_remain", "40", "--num_attention_heads_remain", "4",
                  "--ffn_hidden_size_remain", "32", "--drop_layers", "2", "--prune_type", "balance", "--no_progress"]
    verb_flags = ["prune", "--input", str(mg), "--hidden-size", "40", "--num-attention-heads", "4",
                  "--ffn-hidden-size", "32", "--drop-layers", "2", "--prune-type", "balance", "--no-progress"]
    refit, plain = tmp_path / "refit", tmp_path / "plain"
    same_output(refit, lambda: sh(["bash", "scripts/prune_llama.sh", *seed_flags, "--save", str(refit)]),
                lambda: verb(*verb_flags, "--output", str(refit)), refit=True)
    same_output(plain, lambda: sh(["bash", "scripts/prune_llama.sh", *seed_flags], SAVE=str(plain), RECONSTRUCT="none"),
                lambda: verb(*verb_flags, "--output", str(plain), "--reconstruct", "none"))
    assert PrunePlan.load(refit).info["reconstruct"]["method"] == "least-squares"
    assert "reconstruct" not in PrunePlan.load(plain).info and PrunePlan.load(plain) == PrunePlan.load(refit)
    refit_files, plain_files = files_of(refit), files_of(plain)
    assert refit_files.keys() == plain_files.keys()
    changed = [k for k, v in refit_files.items() if k.endswith(".pt") and v != plain_files[k]]
    assert len(changed) == 2, changed  # both TP shards hold refit weights
    parsed = prune_llama_parser().parse_args([*seed_flags, "--save", "x", "--reconstruct", "none"])
    assert "--reconstruct none" in " ".join(prune_llama_argv(parsed))  # python prune_llama.py --reconstruct none


def test_seed_prune_llama_refuses_gpt_args_that_contradict_the_checkpoint(tiny_hf, tmp_path):
    mg = ops.hf_to_megatron(tiny_hf("llama-gqa"), tmp_path / "mg", tp=2, progress=False)
    r = subprocess.run(["bash", "scripts/prune_llama.sh", "--load", str(mg), "--save", str(tmp_path / "out"),
                        "--hidden_size_remain", "40", "--tensor-model-parallel-size", "4", "--num-layers", "32",
                        "--hidden-size", "48"], cwd=ROOT, env=seed_env(), capture_output=True, text=True)
    assert r.returncode == 2 and not (tmp_path / "out").exists()
    assert r.stderr.strip().splitlines()[-1] == (
        f"prune_llama.py: error: Megatron flags disagree with the checkpoint {mg}: --tensor-model-parallel-size 4 "
        "(the checkpoint has 2); --num-layers 32 (the checkpoint has 4); pruning reads the model's shape and layout "
        "from the checkpoint, so drop these flags or correct them")
    r = subprocess.run(["bash", "scripts/prune_llama.sh", "--load", str(mg), "--save", str(tmp_path / "out"),
                        "--hidden_size_remian", "40"], cwd=ROOT, env=seed_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "prune_llama.py: error: unrecognized arguments: --hidden_size_remian 40" in r.stderr


def test_seed_transfer_sh_is_reshard_and_says_what_it_drops(tiny_hf, tmp_path):
    mg = ops.hf_to_megatron(tiny_hf("llama-gqa"), tmp_path / "mg", tp=2, progress=False)
    out, holder = tmp_path / "tp1", {}
    same_output(out, lambda: holder.setdefault("r", sh(["bash", "scripts/transfer.sh", "--no-progress"], LOAD=str(mg),
                                                       SAVE=str(out), TP="1")),
                lambda: verb("reshard", "--input", str(mg), "--output", str(out), "--tp", "1", "--no-progress"))
    assert "iteration is reset to 0" in holder["r"].stdout
    help_text = sh(["bash", "scripts/transfer.sh", "--help"]).stdout
    assert "iteration is reset to 0" in help_text and "optimizer" in help_text


def refused(argv: list[str], cwd: Path = ROOT, **variables: str) -> subprocess.CompletedProcess:
    """``argv`` run as :func:`sh` runs it, left to fail (its exit status and output are the test's to check)."""
    return subprocess.run(argv, cwd=cwd, env=seed_env(**variables), capture_output=True, text=True, timeout=600)


def test_seed_shell_scripts_say_which_of_variable_and_flag_is_used(tiny_hf, tmp_path):
    """LOAD=A with --input B (HF=A with --load_path B): the flag wins, as check_model.sh's flags do, and a note says
    so (it was a silent choice); the same value both ways needs no note."""
    hf = tiny_hf("llama-gqa")
    mg, out = tmp_path / "mg", tmp_path / "tp1"
    r = sh(["bash", "scripts/hf_to_megatron.sh", "--load_path", str(hf), "--no-progress"], HF=str(tmp_path / "old"),
           MG=str(mg), TP="2")
    assert r.stdout.splitlines()[0] == (f"hf_to_megatron.sh: note: --load_path {hf} is used, not HF={tmp_path / 'old'} "
                                        "(a flag given as an argument wins)")
    assert f"wrote Megatron checkpoint {mg} (TP=2, " in r.stdout
    r = sh(["bash", "scripts/transfer.sh", "--input", str(mg), "--tp", "1", "--no-progress"], LOAD=str(tmp_path / "x"),
           SAVE=str(out), TP="2")
    assert r.stdout.splitlines()[:2] == [
        f"transfer.sh: note: --input {mg} is used, not LOAD={tmp_path / 'x'} (a flag given as an argument wins)",
        "transfer.sh: note: --tp 1 is used, not TP=2 (a flag given as an argument wins)"]
    assert f"wrote {out} (TP=1, " in r.stdout
    r = sh(["bash", "scripts/transfer.sh", f"--load-dir={mg}", "--output", str(tmp_path / "same"), "--no-progress"],
           LOAD=str(mg))
    assert "note: --load-dir" not in r.stdout
    nope, old = tmp_path / "nope", tmp_path / "old"
    r = refused(["bash", "scripts/prune_llama.sh", "--load", str(nope), "--save", str(tmp_path / "o")], LOAD=str(old))
    assert r.returncode == 2 and r.stdout.splitlines()[0] == (
        f"prune_llama.sh: note: --load {nope} is used, not LOAD={old} (a flag given as an argument wins)")


def test_seed_shell_scripts_refuse_bad_values_in_one_line(tiny_hf, tmp_path):
    """A value the tool's parser cannot read is its one error line, no usage before it (usage is --help's); a bad
    TP or PP variable is named as the variable; nothing is written."""
    hf, out = tiny_hf("llama-gqa"), tmp_path / "out"
    cases = [(["bash", "scripts/transfer.sh", "--tp", "abc"], dict(LOAD=str(hf), SAVE=str(out)),
              "reshard.py: error: argument --tp: invalid int value: 'abc'"),
             (["bash", "scripts/hf_to_megatron.sh", "--pp", "two"], dict(HF=str(hf), MG=str(out)),
              "hf_to_megatron.py: error: argument --pp: invalid int value: 'two'"),
             (["bash", "scripts/transfer.sh"], dict(LOAD=str(hf), SAVE=str(out), TP="x"),
              "transfer.sh: error: TP=x: expected a whole number >= 1"),
             (["bash", "scripts/hf_to_megatron.sh"], dict(HF=str(hf), MG=str(out), PP="0"),
              "hf_to_megatron.sh: error: PP=0: expected a whole number >= 1")]
    for argv, variables, line in cases:
        r = refused(argv, **variables)
        assert (r.returncode, r.stderr, r.stdout) == (2, line + "\n", ""), (argv, r.stderr)
        assert not out.exists()


@pytest.mark.parametrize("config", ["seed", "hf"])
def test_seed_prune_hf_takes_its_own_config_and_a_whole_hf_config(tiny_hf, tmp_path, config):
    """`cd prune_hf; python prune_llama.py --model_name_or_path M --prune_config_path C --output_path O`: with the
    seed's prune_config.json keys, and with a whole HF config.json of the smaller model."""
    hf, out = tiny_hf("llama-gqa"), tmp_path / "out"
    target = {"hidden_size": 40, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 32,
              "num_hidden_layers": 2}
    if config == "seed":
        cfg = {"hidden_size_remain": 40, "num_attention_heads_remain": 4, "ffn_hidden_size_remain": 32,
               "drop_layers": [1, 2]}
        verb_flags = ["--hidden-size", "40", "--num-attention-heads", "4", "--ffn-hidden-size", "32", "--drop-layers",
                      "1,2"]
    else:
        cfg = {**json.loads((hf / "config.json").read_text()), **target, "_name_or_path": "small", "torch_dtype": "x"}
        verb_flags = ["--hidden-size", "40", "--num-attention-heads", "4", "--num-query-groups", "2",
                      "--ffn-hidden-size", "32", "--num-layers", "2"]
    (tmp_path / "prune_config.json").write_text(json.dumps(cfg))
    holder = {}
    same_output(out, lambda: holder.setdefault("r", sh([sys.executable, "prune_llama.py", "--model_name_or_path",
                                                        str(hf), "--prune_config_path",
                                                        str(tmp_path / "prune_config.json"), "--output_path",
                                                        str(out)], cwd=ROOT / "prune_hf")),
                lambda: verb("prune", "--input", str(hf), "--output", str(out), *verb_flags, "--no-progress"))
    assert ("is a whole HF config" in holder["r"].stdout) == (config == "hf")
    if config == "seed":  # --reconstruct reaches the verb: this model has no tokenizer to refit with
        r = subprocess.run([sys.executable, "prune_llama.py", "--model_name_or_path", str(hf), "--prune_config_path",
                            str(tmp_path / "prune_config.json"), "--output_path", str(tmp_path / "x"),
                            "--reconstruct", "least-squares"], cwd=ROOT / "prune_hf", env=seed_env(),
                           capture_output=True, text=True)
        assert r.returncode == 2 and "prune_hf/prune_llama.py: error: --reconstruct least-squares" in r.stderr


def test_seed_prune_hf_refuses_a_size_written_as_a_string(tiny_hf, tmp_path):
    """{"num_hidden_layers": "2"} was read as 2 without a word: refused in one line naming the key and the value
    (a list where a number goes, a layer number written as a string, alike); nothing is written."""
    hf, out, cfg = tiny_hf("llama-gqa"), tmp_path / "out", tmp_path / "prune_config.json"
    cases = {'"num_hidden_layers": "2"': 'num_hidden_layers: "2" is not a whole number; write e.g. 32',
             '"hidden_size": [40]': "hidden_size: [40] is not a whole number; write e.g. 32",
             '"ffn_hidden_size_remain": true': "ffn_hidden_size_remain: true is not a whole number; write e.g. 32",
             '"num_hidden_layers": 3.5': "num_hidden_layers: 3.5 is not a whole number; write e.g. 32",
             '"drop_layers": [1, "2"]': 'drop_layers: [1, "2"] holds "2", not a layer number; write whole numbers, '
                                         'e.g. [5, 12]'}
    for entry, says in cases.items():
        cfg.write_text(f"{{{entry}}}")
        r = refused([sys.executable, "prune_llama.py", "--model_name_or_path", str(hf), "--prune_config_path",
                     str(cfg), "--output_path", str(out)], cwd=ROOT / "prune_hf")
        assert (r.returncode, r.stderr) == (2, f"prune_hf/prune_llama.py: error: --prune_config_path {cfg}: {says}\n")
        assert not out.exists()


def test_seed_prune_llama_bad_value_is_one_line_without_usage(tiny_hf, tmp_path):
    """A seed flag's or a Megatron flag's value of the wrong type (--num-layers abc) is the parser's one error line:
    Megatron's flag parser printed ~700 lines of usage before it."""
    hf = tiny_hf("llama-gqa")
    for flag in ("--num-layers", "--num_layers_remain"):
        r = refused([sys.executable, "prune_llama.py", "--load", str(hf), "--save", str(tmp_path / "x"), flag, "abc"])
        assert (r.returncode, r.stderr) == (2, f"prune_llama.py: error: argument {flag}: invalid int value: 'abc'\n")
        assert not (tmp_path / "x").exists()


def test_seed_emb_pruner_layout_counts_then_prunes_as_the_vocab_verbs(tmp_path):
    """`cd emb_pruner/llama_emb_pruner; bash get_vocab_freq.sh`, then `bash prune_spm_and_emb.py` (the seed README's
    own words, a .py run by bash): the files of `vocab count` and `vocab prune --keep N --counts`."""
    tok = make_bytelevel_tokenizer(tmp_path / "tok")
    model = model_with_tokenizer(tmp_path / "model", "llama-gqa", tok)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(calib_docs()[::25]))
    work = ROOT / "emb_pruner" / "llama_emb_pruner"
    out = tmp_path / "small"
    sh(["bash", "get_vocab_freq.sh"], cwd=work, DATA_PATH=str(corpus), SPM=str(tok / "tokenizer.json"),
       REMAIN_VOCAB_SIZE="1700", VOCAB_FREQ=str(tmp_path / "vocab_freq"),
       REMAIN_VOCAB_IDS_PATH=str(tmp_path / "remain_vocab_ids.pt"))
    verb("vocab", "count", "--tokenizer", str(tok), "--data", str(corpus), "--output", str(tmp_path / "counts.json"),
         "--no-progress")
    assert (tmp_path / "vocab_freq.json").read_bytes() == (tmp_path / "counts.json").read_bytes()
    same_output(out, lambda: sh(["bash", "prune_spm_and_emb.py"], cwd=work, HF_DIR=str(model), SAVE_DIR=str(out),
                                REMAIN_VOCAB_PATH=str(tmp_path / "remain_vocab_ids.pt")),
                lambda: verb("vocab", "prune", "--input", str(model), "--output", str(out), "--keep", "1700",
                             "--counts", str(tmp_path / "counts.json"), "--no-progress"))


def test_seed_prune_llama_help_and_errors_speak_the_seed_flags(tiny_hf, tmp_path):
    """--help names the real default (auto) and accepts activation; an error names the flag the user typed."""
    from megatron.prune.scoring.methods import SCORERS
    from megatron.prune.seed.prune import METHODS

    assert set(METHODS) == {"auto", *SCORERS}
    help_text = " ".join(sh([sys.executable, "prune_llama.py", "--help"]).stdout.split())
    assert "(default auto)" in help_text and "default random" not in help_text and "activation" in help_text
    cases = [(["--ffn_hidden_size_remain", "100"], "--ffn_hidden_size_remain 100 is not possible: the source has 64"),
             (["--ffn_hidden_size_remain", "33", "--tensor_model_parallel_size", "2"],
              "--ffn_hidden_size_remain 33 is not divisible by --tensor_model_parallel_size 2")]
    for extra, words in cases:
        r = subprocess.run([sys.executable, "prune_llama.py", "--load", str(tiny_hf("llama-gqa")), "--save",
                            str(tmp_path / "x"), *extra], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith(f"prune_llama.py: error: {words}"), r.stderr
        assert "--ffn-hidden-size" not in r.stderr and "--tp " not in r.stderr


def test_entry_scripts_run_with_python_also_when_started_with_bash(tmp_path):
    """`bash X.py` (the seed README writes `bash prune_spm_and_emb.py`) runs the script, never a shell command out of
    its docstring: each entry script's first statement sends bash on to Python (or to the .sh beside it)."""
    scripts = sorted({*ROOT.glob("*.py"), *ROOT.glob("prune_hf/*.py"), *ROOT.glob("emb_pruner/**/*.py"),
                      *ROOT.glob("tools/**/*.py")})
    assert len(scripts) >= 11
    for script in scripts:
        assert script.read_text().splitlines()[1].startswith("''''exec "), script
        if script.name == "pretrain_llama.py":  # its --help imports megatron.training (test_cli runs it)
            continue
        r = subprocess.run(["bash", str(script), "--help"], cwd=tmp_path, env=seed_env(), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.strip() and not r.stderr.strip(), (script, r.stderr[-500:])
        assert list(tmp_path.iterdir()) == [], script


def test_entry_points_without_torch_say_so_in_one_line(tmp_path):
    """A Python without torch (the venv not activated): one line naming what is missing, no traceback."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    python = str(bare / "bin" / "python")
    for argv in (["bash", "scripts/prune_llama.sh", "--load", "a", "--save", "b"],
                 ["bash", "scripts/check_model.sh"], [python, "prune_llama.py", "--help"],
                 ["bash", "emb_pruner/llama_emb_pruner/prune_spm_and_emb.py", "--hf_dir", "x"]):
        r = subprocess.run(argv, cwd=ROOT, env=dict(seed_env(), PYTHON=python, PYTHONPATH=""), capture_output=True,
                           text=True)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and "cannot import torch" in lines[0], (argv, r.stderr)


def test_every_shell_script_help_prints_its_header():
    """`bash X.sh --help` prints the script's header comment (its usage and variables) and runs nothing else."""
    scripts = sorted({*ROOT.glob("scripts/*.sh"), *ROOT.glob("tools/**/*.sh"), *ROOT.glob("emb_pruner/**/*.sh")})
    assert len(scripts) >= 9
    for script in scripts:
        header = []
        for line in script.read_text().splitlines()[1:]:
            if not line.startswith("#"):
                break
            header.append(line[2:] if line.startswith("# ") else line[1:])
        r = subprocess.run(["bash", str(script), "--help"], env=dict(seed_env(), PYTHON="/nonexistent"),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.splitlines() == header and len(header) >= 3, script


def test_tool_help_has_no_direction_positional():
    for tool, other in (("hf_to_megatron.py", "megatron-to-hf"), ("megatron_to_hf.py", "hf-to-megatron")):
        r = sh([sys.executable, f"tools/checkpoint_conversion/{tool}", "--help"])
        assert "{hf-to-megatron,megatron-to-hf}" not in r.stdout and other not in r.stdout.split("options:")[0]
        assert "--load_path" in r.stdout and "--input" in r.stdout
