"""The CLI table and its parser stay in sync; every verb explains itself."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from megatron.prune.cli import VERBS, build_parser


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_help(verb, capsys):
    mod = importlib.import_module(VERBS[verb])
    assert mod.HELP and mod.__doc__
    with pytest.raises(SystemExit) as e:
        build_parser([verb]).parse_args([verb, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"megatron-prune {verb}" in out
    for action in build_parser([verb])._subparsers._group_actions[0].choices[verb]._actions:
        if action.option_strings and action.dest != "help" and action.help != "==SUPPRESS==":
            assert action.help, f"{verb} {action.option_strings} has no help"


def test_unknown_flags_and_ctrl_c_are_reported_for_the_verb(monkeypatch, capsys):
    """An unknown flag is reported under the verb's usage (argparse alone shows the top-level one); Ctrl-C ends
    with one line and exit code 130, not a traceback."""
    from megatron.prune import cli
    from megatron.prune.commands import data

    with pytest.raises(SystemExit) as e:
        cli.main(["data", "--input", "a", "--output-prefix", "b", "--tokenizer", "c", "--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: megatron-prune data" in err
    assert "megatron-prune data: error: unrecognized arguments: --bogus" in err

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "run", interrupted)
    assert cli.main(["data", "--input", "a", "--output-prefix", "b", "--tokenizer", "c"]) == 130
    assert capsys.readouterr().err == "megatron-prune data: interrupted; nothing half-written is left\n"


def test_console_script_lists_verbs():
    out = subprocess.run([sys.executable, "-m", "megatron.prune", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for verb in VERBS:
        assert verb in out


def test_pretrain_llama_help_prints_megatrons_flags_and_ours():
    """argparse %-formats every help text, and megatron-core 0.19.2 has a bare "10%)" in one: --help raised
    ValueError. It now prints Megatron's flags and the distillation group."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "pretrain_llama.py"), "--help"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(e.g. 1.10 = 10%)" in " ".join(r.stdout.split())  # the help that broke, as written
    assert "megatron-prune recovery" in r.stdout and "--kd-teacher-load" in r.stdout
    assert "--micro-batch-size" in r.stdout and "Recovery training of a pruned LLaMA-family model" in r.stdout


def test_file_to_file_verbs_hide_missing_backend_notices(capsys):
    """megatron-core's import-time notices about Transformer Engine / Apex (four per convert of a trained checkpoint)
    are hidden once the CLI runs; other warnings still show."""
    import warnings

    from megatron.prune.cli import main

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit):
            main(["reshard", "--help"])
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
        warnings.warn("Apex is not installed. Falling back to Torch Norm")
        warnings.warn("something else")
    assert [str(w.message) for w in seen] == ["something else"]


def test_plan_show_says_what_was_kept_dropped_and_how(tiny_hf, tmp_path, capsys):
    """`plan show DIR|prune_plan.json`: method and settings, shape, dropped layers and hidden channels, and per kept
    layer its KV groups and heads (kept, dropped) and FFN count, each read back against the plan itself."""
    from megatron.prune.cli import main
    from megatron.prune.core.plan import PrunePlan
    from tiny_corpus import make_bytelevel_tokenizer, model_with_tokenizer

    model = model_with_tokenizer(tmp_path / "m", "llama-gqa", make_bytelevel_tokenizer(tmp_path / "tok", 600))
    assert main(["prune", "--input", str(model), "--output", str(tmp_path / "small"), "--hidden-size", "40",
                 "--num-attention-heads", "4", "--ffn-hidden-size", "32", "--num-layers", "3", "--samples", "4",
                 "--seq-len", "32", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["plan", "show", str(tmp_path / "small")]) == 0
    out = capsys.readouterr().out.splitlines()
    plan = PrunePlan.load(tmp_path / "small")
    dropped = [i for i in range(4) if i not in {lp.source_layer for lp in plan.layers}]
    assert out[1] == ("method: activation, chosen by --method auto (calibration builtin:calib: 4 windows of 32 tokens, "
                      "aggregation rms, float32)")
    r = plan.info["reconstruct"]  # the refit is the default with activation selection
    assert out[2] == (f"reconstruction: least-squares of the linears qkv, o, gate_up, down (lm_head auto, damping "
                      f"{r['damping']}) on {r['tokens']} tokens of builtin:calib (4 windows of 32, float32): relative "
                      f"error {r['error_sliced']:.4f} (sliced) -> {r['error_refit']:.4f}, {r['seconds']}s; "
                      f"calibration loss {r['calibration_loss']['original']} (original) -> "
                      f"{r['calibration_loss']['pruned_refit']} (pruned, refit) on 124 tokens")
    assert out[3].startswith("layers: block influence") and "TP 1, balance; RMSNorm weights x 1.095" in out[3]
    assert out[4] == ("shape: layers 4 -> 3, hidden 48 -> 40, query heads 8 -> 4, KV groups 4 -> 2, FFN 64 -> 32, "
                      "vocab 600")
    assert out[6] == f"dropped layers: {dropped[0]}" and out[7] == "hidden: 40 of 48 channels kept, 8 dropped"
    rows = [line.split() for line in out[9:]]
    assert len(rows) == 3

    def expand(text: str) -> list[int]:
        if text.strip("()") == "-":
            return []
        return [i for part in text.strip("()").split(",")
                for i in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)]

    for row, lp in zip(rows, plan.layers):
        assert int(row[1]) == lp.source_layer and row[6] == "32/64"
        assert expand(row[2]) == list(lp.query_groups) and expand(row[3]) == [g for g in range(4) if g not in
                                                                                lp.query_groups]
        assert expand(row[4]) == list(lp.heads) and expand(row[5]) == [h for h in range(8) if h not in lp.heads]
    from megatron.prune.commands.plan import ids

    assert main(["plan", "show", str(tmp_path / "small" / "prune_plan.json"), "--indices"]) == 0
    assert f"hidden: 40 of 48 channels kept, 8 dropped: kept {ids(plan.hidden)}" in capsys.readouterr().out
    assert ids([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and ids([]) == "-" and expand(ids(plan.hidden)) == list(plan.hidden)
    assert main(["prune", "--input", str(model), "--output", str(tmp_path / "plain"), "--plan",
                 str(tmp_path / "small" / "prune_plan.json"), "--reconstruct", "none", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["plan", "show", str(tmp_path / "plain")]) == 0
    line = capsys.readouterr().out.splitlines()[2]
    assert line == "reconstruction: none (the kept weights are the original's, sliced)"
    assert main(["plan", "show", str(model)]) == 2
    assert "has no prune_plan.json" in capsys.readouterr().err


def test_no_progress_silences_the_libraries_bars_too(tok_model, capsys):
    """transformers drew its "Loading weights" bar on stderr under --no-progress (eval, score, prune, demo); without
    the flag it still does, also after a --no-progress run in the same process (and in the programs it starts: no
    environment variable is set). The hub read its switch from the environment once, on import, and warned at the
    end of every --no-progress run that imported it."""
    import os

    from megatron.prune.cli import main

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    argv = [sys.executable, "-m", "megatron.prune", "eval", "--model", str(tok_model), "--max-tokens", "64",
            "--seq-len", "32", "--device", "cpu"]
    quiet = subprocess.run([*argv, "--no-progress"], capture_output=True, text=True, timeout=300, env=env)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "Loading weights" not in quiet.stderr and "it/s" not in quiet.stderr, quiet.stderr[-2000:]
    assert "Cannot enable progress bars" not in quiet.stderr  # the hub's warning at the end of the run
    loud = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert loud.returncode == 0 and "Loading weights" in loud.stderr
    before = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    assert main([*argv[3:], "--no-progress"]) == 0
    assert "Loading weights" not in capsys.readouterr().err
    assert os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == before
    if before is None:
        assert main(argv[3:]) == 0
        assert "Loading weights" in capsys.readouterr().err


def test_plan_show_names_dropped_layers_run_by_run_without_listing_them():
    """`plan show` of a damaged plan claiming 10^9 source layers listed every dropped number first (a MemoryError
    traceback): the runs come from the kept layers alone, the same text as before."""
    from megatron.prune.commands.plan import ids, missing_ids

    for n, kept in ((0, set()), (1, {0}), (5, {0, 4}), (6, {1, 2}), (3, {0, 1, 2}), (7, {6})):
        assert missing_ids(kept, n) == ids([i for i in range(n) if i not in kept])
    assert missing_ids({0, 1, 2, 3}, 10 ** 9) == "4-999999999"


def test_golden_outputs_explains_itself_and_wipes_only_its_own_folder(tmp_path):
    """bench/golden_outputs.py read sys.argv[2] bare (--help was an IndexError traceback) and wiped whatever folder
    came second, a checkout included. Now --help prints its docstring, and a non-empty folder it did not write is
    refused untouched."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "golden_outputs.py"
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Developer check for refactors" in r.stdout, r.stderr[-2000:]
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    r = subprocess.run([sys.executable, str(script), ".", str(theirs)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "is not a folder this script wrote before" in r.stderr
    assert "Traceback" not in r.stderr and (theirs / "keep.txt").read_text() == "mine"
