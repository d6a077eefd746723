"""Recovery training through ``scripts/check_model.sh`` → ``pretrain_llama.py`` → stock ``pretrain``.

CPU (gloo + shims). Checkpoints come from our own tools: a tiny random HF model converted with
``hf_to_megatron`` (TP=1, TP=2) and pruned with ``megatron-prune prune`` (the same plan at both TPs).
Proves, with the stock ``megatron.training.checkpointing`` loader doing the loading:
- pruned TP=1 and TP=2 checkpoints load with ``--use-checkpoint-args --finetune`` (no shape flags),
  give the same first loss at both TPs, and train (loss decreases over 10 iterations);
- a never-trained checkpoint at LOAD == SAVE starts as with --finetune;
- save then resume ⇒ the continuous run's losses, grad norms and (torch format) weights, exactly;
- converted TP=1 (LR 0) and TP=2 (KD, alpha 1, teacher == student) checkpoints come back unchanged
  from the loop's own save: every tensor was loaded, the KD loss is 0 and its gradient is 0;
- --tensorboard-dir gets each iteration's losses; validation reports the LM and KD losses;
- --bf16 with KD (as on a GPU) trains and saves bf16 weights;
- the vocab-parallel KL at TP=2 equals a plain-torch KL on gathered logits (values and gradients);
- a tied-embedding checkpoint converted at PP=2 gives the PP=1 first loss; distillation at PP=2 (a pruned
  student beside its unpruned teacher) gives the PP=1 losses and grad norms; a torch_dist teacher loads at
  another TP;
- --reset-attention-mask keeps documents apart (two documents per sample give the one-document loss);
- LLaMA-3.x RoPE scaling comes from the checkpoint; a checkpoint written for the other layer spec, or one that
  does not fit the model, is refused (the stock loader would load what fits and go on);
- bad inputs fail before training.
Start-up (~10-20 s per process) dominates, so the launches are few and two single-process ones
run side by side (see ``runs``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.prune.errors import PruneError
from megatron.prune.formats.mcore import read
from megatron.prune.training import checkpoints
from megatron.prune.training import kd
from megatron.prune.training import teacher as teacher_mod
from tests.procs import free_port
from tests.tiny import LLAMA3_ROPE
from tests.tiny_corpus import make_hf_tokenizer, make_spm_tokenizer, pydoc_documents, write_ids, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
ITER_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*")
# the pruned target of the tiny llama-gqa model (hidden 48, 8 heads / 4 groups, ffn 64, 4 layers)
PRUNE_FLAGS = ["--hidden-size", "40", "--num-attention-heads", "4", "--num-query-groups", "2",
               "--ffn-hidden-size", "32", "--num-layers", "3", "--method", "magnitude", "--no-progress"]
VOCAB, DIVISIBLE_BY = 300, 192  # padded vocab 384 at TP=1 and TP=2: the same model at both TPs
SPM_VOCAB = 200
TIED_PRUNE = ["--hidden-size", "40", "--ffn-hidden-size", "32", "--num-layers", "3", "--method", "magnitude",
              "--ckpt-format", "torch_dist", "--no-progress"]

pytestmark = pytest.mark.slow


def parse_losses(log: str, key: str = "lm loss") -> dict[int, str]:
    """iteration -> the value exactly as the stock loop printed it."""
    out = {}
    for m in ITER_RE.finditer(log):
        found = re.search(rf"\| {key}: ([0-9.E+\-]+) \|", m.group(0))
        if found:
            out[int(m.group(1))] = found.group(1)
    return out


def start_check_model(env: dict[str, str], *extra: str) -> subprocess.Popen:
    """``scripts/check_model.sh`` in the background (tiny batch settings; each run its own data cache)."""
    full = {**os.environ, "PYTHON": sys.executable, "MASTER_PORT": str(free_port()),
            "SEQ_LEN": "32", "MICRO_BATCH": "2", "GLOBAL_BATCH": "4", "LR": "3e-3", **env}
    cache = ["--data-cache-path", env["CACHE"]] if "CACHE" in env else []
    return subprocess.Popen(["bash", str(ROOT / "scripts/check_model.sh"), *cache, *extra], env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def finish(p: subprocess.Popen, timeout: int = 600) -> subprocess.CompletedProcess:
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Model tensors of a torch-format iteration folder (all TP ranks), keyed by rank/name."""
    out = {}
    for f in sorted(folder.glob("mp_rank_*/model_optim_rng.pt")):
        model = torch.load(f, map_location="cpu", weights_only=False)["model"]
        out.update({f"{f.parent.name}/{k}": v for k, v in model.items()
                    if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")})
    return out


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a is not b and len(a) > 10 and a.keys() == b.keys(), (sorted(a)[:5], sorted(b)[:5])
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Corpus + tokenizer, converted TP=1/TP=2 checkpoints, and those pruned with one plan."""
    from megatron.prune.cli import main as cli_main
    from megatron.prune.data import preprocess
    from transformers import AutoTokenizer

    from megatron.prune.formats.mcore.ops import hf_to_megatron, reshard
    from megatron.prune.vocab import prune_hf_vocab, prune_megatron_vocab
    from megatron.prune.vocab.folder import tokenizer_tokens
    from tests.tiny import make_tiny_hf

    d = tmp_path_factory.mktemp("recovery")
    tok = make_hf_tokenizer(d / "tok")
    s = preprocess(write_jsonl(d / "c.jsonl", pydoc_documents(120, 4000)), d / "c", tok, progress=False)
    hf = make_tiny_hf(d / "hf", "llama-gqa", vocab_size=VOCAB)
    conv = {tp: hf_to_megatron(hf, d / f"conv_tp{tp}", tp=tp, make_vocab_size_divisible_by=DIVISIBLE_BY,
                               progress=False) for tp in (1, 2)}
    assert cli_main(["prune", "--input", str(conv[1]), "--output", str(d / "pruned_tp1"), *PRUNE_FLAGS]) == 0
    assert cli_main(["prune", "--input", str(conv[2]), "--output", str(d / "pruned_tp2"), "--plan",
                     str(d / "pruned_tp1" / "prune_plan.json"), "--prune-type", "unbalance", "--tp", "2",
                     "--no-progress"]) == 0
    rope = hf_to_megatron(make_tiny_hf(d / "rope_hf", "llama-gqa", vocab_size=VOCAB, **LLAMA3_ROPE), d / "rope_tp1",
                          tp=1, make_vocab_size_divisible_by=DIVISIBLE_BY, progress=False)
    tied = make_tiny_hf(d / "tied_hf", "llama-tied", vocab_size=VOCAB)  # 4 layers: 2 per stage at PP=2
    tied_mg = {pp: hf_to_megatron(tied, d / f"tied_pp{pp}", tp=1, pp=pp, make_vocab_size_divisible_by=DIVISIBLE_BY,
                                  progress=False) for pp in (1, 2)}
    # distillation at PP=2: a pruned tied student (3 layers, hidden 40; torch_dist, so it loads at any layout)
    # beside its unpruned teacher (4 layers, hidden 48)
    assert cli_main(["prune", "--input", str(tied_mg[1]), "--output", str(d / "tied_pruned"), *TIED_PRUNE]) == 0
    dist_tp2 = reshard(conv[2], d / "conv_tp2_dist", ckpt_format="torch_dist", progress=False)
    te = hf_to_megatron(hf, d / "conv_te", tp=1, spec="transformer_engine", make_vocab_size_divisible_by=DIVISIBLE_BY,
                        progress=False)
    unnamed = d / "conv_te_unnamed"  # TE names, but args that do not say so: only the load itself can tell
    shutil.copytree(te, unnamed)
    for f in unnamed.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        state = torch.load(f, weights_only=False)
        del state["args"].transformer_impl
        torch.save(state, f)
    shutil.copytree(conv[1], d / "in_place")  # trained where it lies (LOAD == SAVE)
    nan = shutil.copytree(conv[1], d / "nan_weights")  # a NaN final norm: every loss is NaN
    for f in nan.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        state = torch.load(f, weights_only=False)
        state["model"]["decoder.final_layernorm.weight"].fill_(float("nan"))
        torch.save(state, f)
    # one 16-token document (its last token EOD) over and over: every 32-token sample is two whole documents
    eod = AutoTokenizer.from_pretrained(tok).eos_token_id
    doc = np.append(np.random.default_rng(0).integers(2, VOCAB, 15), eod)
    repeated = write_ids(d / "repeated_text_document", [doc] * 200)
    spm = make_spm_tokenizer(d / "spm", vocab_size=SPM_VOCAB)  # LLaMA-2 style tokenizer.model
    spm_data = preprocess(d / "c.jsonl", d / "c_spm", spm, progress=False)
    spm_mg = hf_to_megatron(make_tiny_hf(d / "spm_hf", "llama-gqa", vocab_size=SPM_VOCAB), d / "spm_tp1", tp=1,
                            progress=False)
    # a student with a pruned vocabulary (300 -> 290 tokens: padded to 384 all the same), its unpruned teacher, and
    # that teacher given the student's vocabulary (`vocab prune --like`); tokenizers travel in hf_meta/
    hf_tok = shutil.copytree(hf, d / "hf_tok")
    for f in tok.iterdir():
        shutil.copy2(f, hf_tok / f.name)
    prune_hf_vocab(hf_tok, d / "hf_v", keep=VOCAB - 10, progress=False)
    teacher_full = hf_to_megatron(hf_tok, d / "teacher_full", tp=1, make_vocab_size_divisible_by=DIVISIBLE_BY,
                                  progress=False)
    prune_megatron_vocab(teacher_full, d / "teacher_v", like=tokenizer_tokens(d / "hf_v"), progress=False)
    # the student is moved after conversion: its args name a tokenizer path (its hf_meta/) that is gone
    made = hf_to_megatron(d / "hf_v", d / "student_v_made", tp=1, make_vocab_size_divisible_by=DIVISIBLE_BY,
                          progress=False)
    vocab_pruned = {"TOKENIZER": str(d / "hf_v"), "teacher_full": teacher_full, "teacher_v": d / "teacher_v",
                    "DATA": str(preprocess(d / "c.jsonl", d / "c_v", d / "hf_v", progress=False).bin_path)[:-4],
                    "mg": Path(shutil.move(made, d / "student_v")), "made": made}
    return {"dir": d, "TOKENIZER": str(tok), "DATA": str(s.bin_path)[: -len(".bin")], "vocab_pruned": vocab_pruned,
            "conv": conv, "pruned": {tp: d / f"pruned_tp{tp}" for tp in (1, 2)},
            "repeated": repeated,
            "foreign": write_ids(d / "foreign_text_document", [np.arange(VOCAB - 50, DIVISIBLE_BY * 2)]),
            "tied": tied_mg, "tied_pruned": d / "tied_pruned", "dist_tp2": dist_tp2,
            "te": te, "te_unnamed": unnamed, "rope": rope,
            "spm": {"TOKENIZER": str(spm), "DATA": str(spm_data.bin_path)[: -len(".bin")], "mg": spm_mg}}


# ---- single-process cases in one interpreter: megatron imported once, each case a forked child ----
def driver_argv(inputs, *extra: str, load: Path | None = None, iters: int = 2) -> list[str]:
    """pretrain_llama.py flags as check_model.sh builds them (TP=1, tiny batches)."""
    argv = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", inputs["TOKENIZER"],
            "--data-path", inputs["DATA"], "--split", "100,0,0", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(iters),
            "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--clip-grad", "1.0",
            "--log-interval", "1", "--eval-interval", str(iters), "--eval-iters", "0",
            "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--ckpt-format", "torch",
            "--data-cache-path", str(inputs["dir"] / "cache_driver")]
    if load is not None:
        argv += ["--load", str(load), "--use-checkpoint-args", "--no-use-tokenizer-model-from-checkpoint-args",
                 "--finetune"]
    return argv + list(extra)


def _run_cases(spec_path: str) -> None:
    """Worker: run each ``{"argv", "log"}`` of the spec through ``recipe.main`` in a forked child."""
    import megatron.training.training  # noqa: F401  (the slow import, paid once)
    from megatron.prune.training import recipe

    for case in json.loads(Path(spec_path).read_text()):
        pid = os.fork()
        if pid == 0:
            with open(case["log"] + ".out", "w") as out, open(case["log"] + ".err", "w") as err:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
                code = 1
                try:
                    code = recipe.main(case["argv"])
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
        _, status = os.waitpid(pid, 0)
        Path(case["log"] + ".rc").write_text(str(os.waitstatus_to_exitcode(status)))


def start_driver(inputs) -> tuple[subprocess.Popen, list[dict]]:
    """Bad inputs (each must fail before training) and converted TP=1 with LR 0, in one process."""
    d, pruned, conv, vp = inputs["dir"], inputs["pruned"], inputs["conv"], inputs["vocab_pruned"]
    cases = [
        ("missing_data", driver_argv({**inputs, "DATA": str(d / "nope_text_document")}, load=pruned[1]),
         "nope_text_document.bin"),
        ("shape_mismatch", driver_argv(inputs, "--hidden-size", "96", load=pruned[1]),
         "hidden_size: checkpoint 40 vs flags 96"),
        ("missing_teacher", driver_argv(inputs, "--kd-teacher-load", str(d / "missing"), load=pruned[1]),
         "--kd-teacher-load"),
        ("teacher_tp", driver_argv(inputs, "--kd-teacher-load", str(conv[2]), load=pruned[1]),
         f"teacher was saved at TP=2, the student runs at TP=1; reshard the teacher: megatron-prune reshard "
         f"--input {conv[2]} --output {conv[2]}-tp1 --tp 1"),
        ("converted_tp1", driver_argv(inputs, "--lr", "0", "--min-lr", "0", "--save", str(d / "conv_tp1_out"),
                                      "--save-interval", "2", load=conv[1]), None),
        ("kd_bf16", driver_argv(inputs, "--bf16", "--kd-teacher-load", str(conv[1]), "--kd-alpha", "1",
                                "--weight-decay", "0", "--save", str(d / "kd_bf16_out"), "--save-interval", "2",
                                load=conv[1]), None),
        ("in_place", driver_argv(inputs, "--load", str(d / "in_place"), "--use-checkpoint-args", "--save",
                                 str(d / "in_place"), "--save-interval", "1", iters=1), None),
        ("spm", driver_argv(inputs, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                            inputs["spm"]["TOKENIZER"], "--data-path", inputs["spm"]["DATA"], iters=1,
                            load=inputs["spm"]["mg"]), None),
        ("llama3_rope", driver_argv(inputs, iters=1, load=inputs["rope"]), None),
        ("tied_pp1", driver_argv(inputs, iters=1, load=inputs["tied"][1]), None),
        ("one_document", driver_argv({**inputs, "DATA": inputs["repeated"]}, "--seq-length", "16", iters=1,
                                     load=inputs["tied"][1]), None),
        ("two_documents_masked", driver_argv({**inputs, "DATA": inputs["repeated"]}, "--reset-attention-mask",
                                             "--reset-position-ids", iters=1, load=inputs["tied"][1]), None),
        ("nan_loss", driver_argv(inputs, "--save", str(d / "nan_out"), "--save-interval", "1", load=d / "nan_weights",
                                 iters=1), None),
        ("missing_sequence_counts", driver_argv(inputs, "--per-dataset-sequences-path", str(d / "counts.json"),
                                                load=pruned[1]),
         f"--per-dataset-sequences-path {d / 'counts.json'}: No such file or directory"),
        ("other_schedule", [*driver_argv(inputs, "--lr", "0", "--min-lr", "0", iters=3), "--load",
                            str(d / "conv_tp1_out"), "--use-checkpoint-args",
                            "--no-use-tokenizer-model-from-checkpoint-args"],
         f"--load {d / 'conv_tp1_out'}: the saved learning-rate schedule differs from this run's flags ("),
        ("moe_flag", driver_argv(inputs, "--num-experts", "4", load=pruned[1]),
         "--num-experts 4: not supported: pretrain_llama.py builds dense LLaMA-family layers"),
        ("kd_tied_pp1", driver_argv(inputs, "--kd-teacher-load", str(inputs["tied"][1]), "--kd-alpha", "0.5",
                                    "--ckpt-format", "torch_dist", load=inputs["tied_pruned"]), None),
        ("kd_dist_teacher", driver_argv(inputs, "--kd-teacher-load", str(inputs["dist_tp2"]), "--kd-alpha", "1",
                                        load=conv[1], iters=1), None),
        ("other_spec", driver_argv(inputs, load=inputs["te"]),
         "has transformer_engine-spec parameter names, but this run builds the local spec"),
        ("partial_load", driver_argv(inputs, load=inputs["te_unnamed"]), "the checkpoint does not fit the model"),
        ("teacher_misfit", driver_argv(inputs, "--kd-teacher-load", str(inputs["te_unnamed"]), load=conv[1]),
         f"error: --kd-teacher-load {inputs['te_unnamed']}: checkpoint {inputs['te_unnamed']}: the checkpoint does "
         "not fit the model"),
        ("missing_tokenizer", driver_argv({**inputs, "TOKENIZER": str(d / "no_tok")}, load=pruned[1]),
         f"--tokenizer-model {d / 'no_tok'}: no such file or folder"),
        ("missing_load", driver_argv(inputs, "--load", str(d / "no_ckpt"), "--use-checkpoint-args"),
         f"--load {d / 'no_ckpt'}: not a Megatron checkpoint folder"),
        ("foreign_tokens", driver_argv({**inputs, "DATA": inputs["foreign"]}, load=pruned[1]),
         f"token id {DIVISIBLE_BY * 2 - 1} is outside the tokenizer's vocabulary of {VOCAB}"),
        ("teacher_vocab", driver_argv({**inputs, **vp}, "--kd-teacher-load", str(vp["teacher_full"]), load=vp["mg"]),
         f"megatron-prune vocab prune --input {vp['teacher_full']} --output {vp['teacher_full']}-vocab --like "
         f"{vp['TOKENIZER']}"),
        ("kd_vocab_like", driver_argv({**inputs, **vp}, "--kd-teacher-load", str(vp["teacher_v"]), "--kd-alpha", "1",
                                      load=vp["mg"], iters=1), None),
    ]
    spec = [{"name": n, "argv": a, "log": str(d / f"case_{n}"), "message": m} for n, a, m in cases]
    (d / "cases.json").write_text(json.dumps(spec))
    p = subprocess.Popen([sys.executable, __file__, "cases", str(d / "cases.json")], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return p, spec


def case_result(case: dict) -> subprocess.CompletedProcess:
    rc = Path(case["log"] + ".rc")
    return subprocess.CompletedProcess(case["name"], int(rc.read_text()) if rc.exists() else -1,
                                       Path(case["log"] + ".out").read_text(), Path(case["log"] + ".err").read_text())


def start_kl_worker(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(free_port()), __file__, "kl", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def runs(inputs):
    """Every launch of this module, scheduled so that single-process jobs share the two cores.

    pruned TP=1 run ∥ driver; TP=1 resume ∥ KL worker; pruned TP=2 run; TP=2 resume; PP=2; KD at PP=2; KD at TP=2.
    """
    d = inputs["dir"]
    data = {"DATA": inputs["DATA"], "TOKENIZER": inputs["TOKENIZER"]}
    r: dict = {}

    def train(tp: int, fmt: str) -> dict:
        return {**data, "TP": str(tp), "TRAIN_ITERS": "10", "CKPT_FORMAT": fmt, "CACHE": str(d / f"cache{tp}")}

    # continuous run from the pruned checkpoint (--finetune, no shape flags), saving at 5 and 10
    tp1 = start_check_model({**train(1, "torch"), "LOAD": str(inputs["pruned"][1]), "SAVE": str(d / "s1"),
                             "SAVE_INTERVAL": "5"}, "--tensorboard-dir", str(d / "tb1"))
    driver, r["cases"] = start_driver(inputs)
    r["tp1"] = finish(tp1)
    r["driver"] = finish(driver)
    # resume at iteration 5 (LOAD == SAVE); the extra --save keeps the continuous run's iteration 10
    tp1r = start_check_model({**train(1, "torch"), "LOAD": str(d / "s1"), "SAVE": str(d / "s1")},
                             "--ckpt-step", "5", "--save", str(d / "s1_resumed"))
    kl = start_kl_worker(d / "kl")
    r["tp1_resumed"] = finish(tp1r)
    r["kl"] = finish(kl)
    r["tp2"] = finish(start_check_model({**train(2, "torch_dist"), "LOAD": str(inputs["pruned"][2]),
                                         "SAVE": str(d / "s2"), "SAVE_INTERVAL": "5"}))
    # no CKPT_FORMAT: check_model.sh takes LOAD's (torch_dist)
    resume2 = {k: v for k, v in train(2, "torch_dist").items() if k != "CKPT_FORMAT"}
    r["tp2_resumed"] = finish(start_check_model({**resume2, "LOAD": str(d / "s2"), "SAVE": str(d / "s2")},
                                                "--ckpt-step", "5"))
    # tied embeddings at PP=2: the last stage holds its own copy of the embedding (a sample-based schedule: one
    # global batch)
    r["pp2"] = finish(start_check_model({**data, "PP": "2", "TRAIN_SAMPLES": "4", "LOAD": str(inputs["tied"][2]),
                                         "CACHE": str(d / "cache_pp2")}))
    # KD at PP=2: the teacher's hidden states travel beside the student's between the stages; the student's
    # layers split 1 + 2, the teacher's (torch format, saved at PP=2) evenly
    kd_pp2 = {**data, "PP": "2", "TRAIN_ITERS": "2", "LOAD": str(inputs["tied_pruned"]),
              "KD_TEACHER": str(inputs["tied"][2]), "KD_ALPHA": "0.5", "CACHE": str(d / "cache_kd_pp2")}
    r["kd_pp2"] = finish(start_check_model(kd_pp2, "--decoder-first-pipeline-num-layers", "1"))
    # KD with teacher == student == the converted TP=2 checkpoint, alpha 1: loss and gradient are 0 (also on
    # the validation split, evaluated after iteration 2)
    r["kd"] = finish(start_check_model({**data, "TP": "2", "TRAIN_ITERS": "2", "LOAD": str(inputs["conv"][2]),
                                        "SAVE": str(d / "kd_out"), "KD_TEACHER": str(inputs["conv"][2]),
                                        "KD_ALPHA": "1", "CACHE": str(d / "cache_kd"), "SPLIT": "90,10,0",
                                        "EVAL_ITERS": "1"}, "--weight-decay", "0"))
    return r


# ---- pruned checkpoints: load, train, save, resume ----------------------------------------------
@pytest.mark.parametrize("tp", [1, 2])
def test_pruned_checkpoint_trains_and_resume_matches_continuous_run(runs, tp):
    full, resumed = ok(runs[f"tp{tp}"]), ok(runs[f"tp{tp}_resumed"])
    losses, after = parse_losses(full.stdout), parse_losses(resumed.stdout)
    assert sorted(losses) == list(range(1, 11)), losses
    assert float(losses[10]) < float(losses[1]) - 0.3, losses
    assert sorted(after) == list(range(6, 11)), after
    norms = parse_losses(full.stdout, "grad norm")
    assert parse_losses(resumed.stdout, "grad norm") == {i: norms[i] for i in range(6, 11)}
    assert {i: after[i] for i in (6, 8, 9, 10)} == {i: losses[i] for i in (6, 8, 9, 10)}
    # stock-loop logging quirk: a process's 2nd logged iteration prints the mean of its first two
    assert float(after[7]) == pytest.approx((float(losses[6]) + float(losses[7])) / 2, abs=2e-6)


def test_tensorboard_dir_gets_the_logged_losses(runs, inputs):
    """--tensorboard-dir writes each iteration's LM loss. At --log-interval 1 the stock log line for iteration 2
    is the mean of iterations 1 and 2 (megatron-core 0.19.2 prints iteration 1 alone, then counts it again)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    printed = {k: float(v) for k, v in parse_losses(ok(runs["tp1"]).stdout).items()}
    events = EventAccumulator(str(inputs["dir"] / "tb1"))
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("lm loss")}
    assert sorted(tb) == sorted(printed) == list(range(1, 11))
    tb[2] = (tb[1] + tb[2]) / 2
    assert tb == pytest.approx(printed, rel=1e-6)
    tags = set(events.Tags()["scalars"])
    assert {"grad-norm", "learning-rate"} <= tags and "kd loss" not in tags  # no teacher in this run


def test_tensorboard_dir_without_tensorboard_is_refused(monkeypatch):
    """Without the package the stock loop would only warn and write nothing."""
    from megatron.prune.training.checks import check_tensorboard

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    check_tensorboard(Namespace(tensorboard_dir=None))
    with pytest.raises(PruneError, match="--tensorboard-dir tb: .*pip install tensorboard"):
        check_tensorboard(Namespace(tensorboard_dir="tb"))


def test_pruned_checkpoint_is_the_same_model_at_tp1_and_tp2(runs):
    """One plan, TP=1 and TP=2 shards: the same first loss; and far above a fresh init's ln(V), so the
    pruned weights (large, random) were loaded rather than initialised."""
    one, two = (float(parse_losses(ok(runs[k]).stdout)[1]) for k in ("tp1", "tp2"))
    assert one == pytest.approx(two, abs=1e-4)
    assert one > torch.log(torch.tensor(384.0)).item() + 1.0, one


def test_resumed_weights_equal_continuous_weights_torch_format(runs, inputs):
    ok(runs["tp1_resumed"])
    d = inputs["dir"]
    assert same_tensors(model_tensors(d / "s1" / "iter_0000010"), model_tensors(d / "s1_resumed" / "iter_0000010"))
    state = torch.load(d / "s1" / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    assert state["args"].num_layers == 3 and state["args"].hidden_size == 40 and state["iteration"] == 10
    assert (d / "s1" / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    assert (d / "s2" / "iter_0000010" / "metadata.json").is_file()  # TP=2 run saved torch_dist


# ---- converted checkpoints: every tensor loaded; KD with teacher == student ----------------------
def test_converted_tp1_checkpoint_loads_with_finetune(runs, inputs):
    """hf_to_megatron's TP=1 checkpoint, --use-checkpoint-args --finetune, LR 0: the loop saves it back
    unchanged (so the stock loader filled every tensor)."""
    ok(runs["driver"])
    case = next(c for c in runs["cases"] if c["name"] == "converted_tp1")
    r = ok(case_result(case))
    assert sorted(parse_losses(r.stdout)) == [1, 2]
    conv, out = inputs["conv"][1], inputs["dir"] / "conv_tp1_out"
    assert same_tensors(model_tensors(next(conv.glob("iter_*")) if not (conv / "release").is_dir()
                                      else conv / "release"), model_tensors(out / "iter_0000002"))
    # hf_meta (HF config) travelled from LOAD to SAVE, so the export has the source's exact config
    from megatron.prune.formats.mcore.ops import megatron_to_hf

    assert (out / "hf_meta" / "config.json").read_text() == (conv / "hf_meta" / "config.json").read_text()
    back = megatron_to_hf(out, inputs["dir"] / "conv_tp1_back", progress=False)
    assert json.loads((back / "config.json").read_text())["rms_norm_eps"] == 1e-5


def test_sentencepiece_tokenizer_trains(runs):
    """A SentencePiece .model (LLaMA-2 style; check_model.sh picks SentencePieceTokenizer for it): data made
    with it passes the token-id check against the SentencePiece vocabulary and trains."""
    ok(runs["driver"])
    r = ok(case_result(next(c for c in runs["cases"] if c["name"] == "spm")))
    assert sorted(parse_losses(r.stdout)) == [1] and 4.0 < float(parse_losses(r.stdout)[1]) < 8.0


def test_never_trained_checkpoint_starts_without_finetune(runs, inputs):
    """LOAD == SAVE on a converted checkpoint (check_model.sh then omits --finetune): it starts as with --finetune,
    the same model (the converted run's first loss), instead of the stock loop stopping for missing optimizer
    state. A checkpoint with training state is resumed as before."""
    ok(runs["driver"])
    r = ok(case_result(next(c for c in runs["cases"] if c["name"] == "in_place")))
    first = ok(case_result(next(c for c in runs["cases"] if c["name"] == "converted_tp1")))
    assert "has never been trained (iteration 0, no optimizer state): starting it as with --finetune" in r.stdout
    assert parse_losses(r.stdout) == {1: parse_losses(first.stdout)[1]}
    assert (inputs["dir"] / "in_place" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert checkpoints.never_trained({"iteration": 0, "args": None})
    assert not checkpoints.never_trained({"iteration": 0, "args": None, "optimizer": {}})  # saved at iteration 0
    assert not checkpoints.never_trained({"iteration": 5, "args": None})  # trained, saved with --no-save-optim


def test_kd_teacher_equal_to_student_gives_zero_kd_loss_and_gradient_at_tp2(runs, inputs):
    r = ok(runs["kd"])
    kd_losses, norms = parse_losses(r.stdout, "kd loss"), parse_losses(r.stdout, "grad norm")
    assert sorted(kd_losses) == [1, 2] and all(float(v) == 0.0 for v in kd_losses.values()), kd_losses
    assert all(float(v) == 0.0 for v in norms.values()), norms
    assert float(parse_losses(r.stdout)[1]) > 6.0  # the LM loss is still reported (and not zero)
    valid = re.search(r"validation loss at iteration 2 \| lm loss value: ([0-9.E+\-]+) \| .*"
                      r"\| kd loss value: ([0-9.E+\-]+) \|", r.stdout)
    assert valid and float(valid.group(1)) > 6.0 and float(valid.group(2)) == 0.0, r.stdout[-3000:]
    conv = inputs["conv"][2]
    src = next(conv.glob("iter_*")) if not (conv / "release").is_dir() else conv / "release"
    assert same_tensors(model_tensors(src), model_tensors(inputs["dir"] / "kd_out" / "iter_0000002"))


def test_bf16_kd_run_as_on_a_gpu(runs, inputs):
    """--bf16 (the GPU default) with a teacher == student, alpha 1: the KD loss and its gradient are 0, the LM
    loss is the fp32 run's to bf16 precision, the saved weights are the checkpoint's in bf16, and export says bf16."""
    ok(runs["driver"])
    r = ok(case_result(next(c for c in runs["cases"] if c["name"] == "kd_bf16")))
    fp32 = ok(case_result(next(c for c in runs["cases"] if c["name"] == "converted_tp1")))
    assert {k: float(v) for k, v in parse_losses(r.stdout, "kd loss").items()} == {1: 0.0, 2: 0.0}
    assert all(float(v) == 0.0 for v in parse_losses(r.stdout, "grad norm").values())
    bf16_loss, fp32_loss = float(parse_losses(r.stdout)[1]), float(parse_losses(fp32.stdout)[1])
    assert bf16_loss != fp32_loss and bf16_loss == pytest.approx(fp32_loss, rel=1e-2)
    conv = inputs["conv"][1]
    src = model_tensors(next(conv.glob("iter_*")) if not (conv / "release").is_dir() else conv / "release")
    saved = model_tensors(inputs["dir"] / "kd_bf16_out" / "iter_0000002")
    assert all(saved[k].dtype == torch.bfloat16 for k in saved)
    assert same_tensors({k: v.to(torch.bfloat16) for k, v in src.items()}, saved)
    # exported as bf16, and its config says so (the source's says float32): transformers loads what was written
    from megatron.prune.formats.mcore.ops import megatron_to_hf

    assert json.loads((conv / "hf_meta" / "config.json").read_text())["dtype"] == "float32"
    back = megatron_to_hf(inputs["dir"] / "kd_bf16_out", inputs["dir"] / "kd_bf16_hf", progress=False)
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"


def test_vocabulary_pruned_student_distils_from_the_teacher_given_its_vocabulary(runs, inputs):
    """The unpruned teacher pads to the student's size yet numbers tokens otherwise: refused (above). Given the
    student's vocabulary with `vocab prune --like`, it is the same model as the student (both are the source with
    the same rows kept, one pruned as HF, the other as Megatron): the KD loss is exactly 0. The student was moved
    after conversion: with check_model.sh's --no-use-tokenizer-model-from-checkpoint-args it trains all the same."""
    ok(runs["driver"])
    r = ok(case_result(next(c for c in runs["cases"] if c["name"] == "kd_vocab_like")))
    assert {k: float(v) for k, v in parse_losses(r.stdout, "kd loss").items()} == {1: 0.0}
    vp = inputs["vocab_pruned"]
    assert checkpoints.checkpoint_args(checkpoints.find_checkpoint(vp["teacher_full"], "teacher")).padded_vocab_size == \
        checkpoints.checkpoint_args(checkpoints.find_checkpoint(vp["mg"], "student")).padded_vocab_size == 384


def test_tied_checkpoint_at_pp2_is_the_same_model_as_at_pp1(runs):
    """Converted at PP=1 and PP=2 (the last stage's own copy of the tied embedding): loaded strictly, the same
    first loss on the same batch."""
    ok(runs["driver"])
    pp1 = ok(case_result(next(c for c in runs["cases"] if c["name"] == "tied_pp1")))
    assert parse_losses(ok(runs["pp2"]).stdout) == parse_losses(pp1.stdout)
    assert len(parse_losses(pp1.stdout)) == 1


def test_kd_at_pp2_equals_kd_at_pp1(runs):
    """Distillation across two pipeline stages (a 3-layer student of width 40 split 1 + 2, its 4-layer teacher of
    width 48 split 2 + 2): the LM and KD losses and the grad norms of both iterations are those of the same run at
    PP=1, so the teacher's hidden states reach the last stage and the student's gradient flows back through the
    shared tensor."""
    ok(runs["driver"])
    pp1 = ok(case_result(next(c for c in runs["cases"] if c["name"] == "kd_tied_pp1"))).stdout
    pp2 = ok(runs["kd_pp2"]).stdout
    for key in ("lm loss", "kd loss", "grad norm"):
        assert parse_losses(pp2, key) == parse_losses(pp1, key), key
    assert sorted(parse_losses(pp1, "kd loss")) == [1, 2] and float(parse_losses(pp1, "kd loss")[1]) > 0.1


def test_torch_dist_teacher_loads_at_the_students_tp(runs):
    """A torch_dist teacher saved at TP=2 distils a TP=1 student (megatron-core reshards it on load): the same
    weights, so the KD loss is 0. (A torch-format teacher at another TP or PP is refused: the teacher_tp case and
    test_teacher_layout_checks.)"""
    ok(runs["driver"])
    r = ok(case_result(next(c for c in runs["cases"] if c["name"] == "kd_dist_teacher")))
    assert {k: float(v) for k, v in parse_losses(r.stdout, "kd loss").items()} == {1: 0.0}


def test_reset_attention_mask_keeps_documents_apart(runs):
    """Every 32-token sample of the repeated-document corpus is two whole 16-token documents: with
    --reset-attention-mask --reset-position-ids its loss is exactly that of the 16-token samples, one document
    each. (The dataset's masks used to be dropped, so the second document attended to the first.)"""
    ok(runs["driver"])
    one, two = (parse_losses(ok(case_result(next(c for c in runs["cases"] if c["name"] == n))).stdout)
                for n in ("one_document", "two_documents_masked"))
    assert one == two and len(one) == 1, (one, two)


def test_nan_loss_stops_the_run_even_in_its_first_iteration(runs, inputs):
    """The loss is validated on each rank before the data-parallel reduction, as stock pretrain_gpt.py does, and
    also in a run's first iteration, which megatron-core leaves unchecked: a one-iteration run from NaN weights used
    to finish with exit code 0 and save NaN weights."""
    ok(runs["driver"])
    r = case_result(next(c for c in runs["cases"] if c["name"] == "nan_loss"))
    assert r.returncode != 0, (r.stdout + r.stderr)[-3000:]
    assert "found NaN in local forward loss calculation in the run's first iteration" in r.stderr, r.stderr[-3000:]
    assert not list((inputs["dir"] / "nan_out").glob("iter_*"))  # nothing saved


def test_llama3_rope_scaling_is_taken_from_the_checkpoint(runs):
    """The stock --use-checkpoint-args loader leaves RoPE scaling out; the recipe adopts it (factor 32, not the
    default 8), and the model built from those args matches transformers (test_megatron_parity)."""
    ok(runs["driver"])
    r = ok(case_result(next(c for c in runs["cases"] if c["name"] == "llama3_rope")))
    assert "Setting use_rope_scaling to True from checkpoint" in r.stdout
    assert "Setting rope_scaling_factor to 32.0 from checkpoint" in r.stdout
    assert sorted(parse_losses(r.stdout)) == [1]


def test_checkpoint_args_the_stock_loader_leaves_out():
    from megatron.prune.training.checks import adopt_checkpoint_args, check_checkpoint_shape

    ckpt = Namespace(norm_epsilon=1e-6, use_rope_scaling=True, rope_scaling_factor=32.0, padded_vocab_size=384)
    flags = Namespace(norm_epsilon=1e-5, use_rope_scaling=False, rope_scaling_factor=8.0, padded_vocab_size=384,
                      load="ck")
    with pytest.raises(PruneError) as e:  # without --use-checkpoint-args: refused, each difference named
        check_checkpoint_shape(ckpt, flags, "--load")
    assert "use_rope_scaling: checkpoint True vs flags False" in str(e.value)
    assert "rope_scaling_factor: checkpoint 32.0 vs flags 8.0" in str(e.value) and "norm_epsilon" in str(e.value)
    adopt_checkpoint_args(ckpt, flags)
    check_checkpoint_shape(ckpt, flags, "--load")
    assert (flags.norm_epsilon, flags.use_rope_scaling, flags.rope_scaling_factor) == (1e-6, True, 32.0)


def test_layer_spec_mismatch_is_refused(monkeypatch):
    from megatron.prune.training import checks
    from megatron.prune.training import model as model_mod

    run = Namespace(transformer_impl="transformer_engine")  # selected, but TE is not installed here
    assert model_mod.layer_spec_name(run) == "local"
    checks.check_layer_spec(Namespace(transformer_impl="local"), run, "--load", "ck")
    checks.check_layer_spec(Namespace(), run, "--load", "ck")  # args that do not say: the load hook decides
    with pytest.raises(PruneError, match="reshard --input ck --output ck-local --transformer-impl local$"):
        checks.check_layer_spec(Namespace(transformer_impl="transformer_engine"), run, "--load", "ck")
    monkeypatch.setattr(model_mod, "have_transformer_engine", lambda: True)  # a GPU machine with TE
    with pytest.raises(PruneError, match="--transformer-impl transformer_engine, or pass --transformer-impl local"):
        checks.check_layer_spec(Namespace(transformer_impl="local"), run, "--load", "ck/")


def test_flags_megatron_refuses_late_are_refused_before_start_up(inputs, monkeypatch, tmp_path):
    """Before Megatron starts: batch sizes that do not divide, two schedules, KD flags without a teacher or out
    of range, --save without --save-interval, --min-lr above --lr (the last two bare assertions), W&B with an
    empty run name, no folder for its files or no package, a sequence longer than the checkpoint's positions, a
    torch_dist checkpoint read as torch, and a moved checkpoint whose args name a tokenizer that is gone; an explicit
    --tokenizer-model is kept."""
    from megatron.prune.training import checks

    def flags_first(argv: list[str]) -> None:
        checks.check_flags_first(checks.preflight_flags(argv))

    def paths_first(argv: list[str]) -> None:
        checks.check_paths_first(checks.preflight_flags(argv))

    monkeypatch.setenv("WORLD_SIZE", "4")
    tp2 = ["--tensor-model-parallel-size", "2", "--micro-batch-size", "2"]  # 4 processes: data-parallel 2
    with pytest.raises(PruneError, match=r"--global-batch-size 6 .* multiple of --micro-batch-size 2 .* "
                                         r"data-parallel size 2"):
        flags_first([*tp2, "--global-batch-size", "6"])
    flags_first([*tp2, "--global-batch-size", "6", "--global-batch-size", "8"])  # the last one wins
    bad = {("--micro-batch-size", "3", "--global-batch-size", "8"): "must be a multiple of --micro-batch-size 3",
           ("--train-iters", "10", "--train-samples", "40"): "TRAIN_SAMPLES=N instead of TRAIN_ITERS",
           ("--kd-alpha", "0.5"): "--kd-alpha: only used with --kd-teacher-load",
           ("--kd-teacher-load", "t", "--kd-alpha", "1.5"): r"--kd-alpha 1.5: must be in \[0, 1\]",
           ("--kd-teacher-load", "t", "--kd-temperature", "0"): "--kd-temperature 0.0: must be > 0",
           ("--save", "out"): r"--save out needs --save-interval N > 0",
           ("--save", "out", "--save-interval", "0"): r"--save out needs --save-interval N > 0",
           ("--lr", "1e-4", "--min-lr", "1e-3"): r"--min-lr 0.001 \(MIN_LR\) is above --lr 0.0001 \(LR\)",
           ("--wandb-project", "p", "--save", "out", "--save-interval", "1", "--wandb-exp-name", ""):
               "--wandb-project p: --wandb-exp-name is empty",
           ("--wandb-project", "p"): r"--wandb-project p: W&B writes its files to SAVE/wandb; pass --save"}
    for argv, message in bad.items():
        with pytest.raises(PruneError, match=message):
            flags_first(list(argv))
    wandb = ["--wandb-project", "p", "--wandb-save-dir", "wb"]  # W&B names the run
    flags_first(wandb)
    find_spec = importlib.util.find_spec
    with monkeypatch.context() as m, pytest.raises(PruneError, match="--wandb-project p: W&B logging needs the "
                                                                      "wandb package"):
        m.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
        flags_first(wandb)

    pruned = str(inputs["pruned"][1])
    max_pos = checkpoints.checkpoint_args(checkpoints.find_checkpoint(pruned, "--load")).max_position_embeddings
    with pytest.raises(PruneError, match=f"--seq-length {max_pos + 1}: longer than the checkpoint's "
                                         f"max_position_embeddings {max_pos}"):
        paths_first(["--load", pruned, "--use-checkpoint-args", "--seq-length", str(max_pos + 1)])
    paths_first(["--load", pruned, "--use-checkpoint-args", "--seq-length", str(max_pos + 1),
                              "--max-position-embeddings", str(max_pos + 1)])
    dist = tmp_path / "dist"
    (dist / "iter_0000003").mkdir(parents=True)
    (dist / "latest_checkpointed_iteration.txt").write_text("3")
    (dist / "iter_0000003" / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    with pytest.raises(PruneError, match="a torch_dist checkpoint, but --ckpt-format is torch"):
        paths_first(["--load", str(dist), "--ckpt-format", "torch_dist", "--ckpt-format", "torch"])
    assert checkpoints.checkpoint_format(dist) == "torch_dist" and checkpoints.checkpoint_format(pruned) == "torch"
    assert checkpoints.checkpoint_format(tmp_path) == "none"

    vp = inputs["vocab_pruned"]  # moved after conversion: its args name <made>/hf_meta, now gone
    with pytest.raises(PruneError, match=f"its args name the tokenizer {vp['made'] / 'hf_meta'}, which does not "
                                         "exist here"):
        paths_first(["--load", str(vp["mg"]), "--use-checkpoint-args"])
    argv = ["--load", str(vp["mg"]), "--use-checkpoint-args", "--tokenizer-model", vp["TOKENIZER"]]
    kept = checks.keep_own_tokenizer(argv)
    assert kept == [*argv, "--no-use-tokenizer-model-from-checkpoint-args"]
    paths_first(kept)
    assert checks.keep_own_tokenizer(kept) == kept and checks.keep_own_tokenizer(argv[:3]) == argv[:3]


def test_schedules_megatron_fails_on_late_are_refused():
    """Evaluation without validation data (crashed after the last step, before the final save), WSD without
    its decay length (a bare assertion); a missing --eval-interval becomes the run's length."""
    from megatron.prune.training import checks

    def args(**kw) -> Namespace:
        base = dict(eval_interval=5, train_iters=20, train_samples=None, global_batch_size=4, eval_iters=0,
                    split="100,0,0", valid_data_path=None, mock_data=False, lr_decay_style="cosine",
                    lr_wsd_decay_iters=None, lr_wsd_decay_samples=None)
        return Namespace(**{**base, **kw})

    for ok_args in (args(), args(eval_iters=2, split="98,2,0"), args(eval_iters=2, valid_data_path=["v"]),
                    args(lr_decay_style="WSD", lr_wsd_decay_iters=4)):
        checks.check_schedule(ok_args)
    with pytest.raises(PruneError, match=r"--eval-iters 2 \(EVAL_ITERS\) but no validation data: --split 100,0,0"):
        checks.check_schedule(args(eval_iters=2))
    with pytest.raises(PruneError, match="WSD needs the length of its decay phase: --lr-wsd-decay-iters"):
        checks.check_schedule(args(lr_decay_style="WSD"))
    for kw, interval in (({}, 20), ({"train_iters": None, "train_samples": 30}, 8)):
        a = args(eval_interval=None, **kw)
        checks.check_schedule(a)
        assert a.eval_interval == interval


def test_unsupported_parallelism_is_refused(monkeypatch):
    """get_batch gives every rank whole sequences: CP > 1 would not split them (and needs TE attention). Sequence
    parallelism needs TE's norms: the local spec's torch RMSNorm asserts it away once the model is built."""
    from megatron.prune.training import checks
    from megatron.prune.training import model as model_mod

    local = Namespace(context_parallel_size=1, sequence_parallel=False, transformer_impl="local")
    checks.check_parallelism(local)
    with pytest.raises(PruneError, match="--context-parallel-size 2: pretrain_llama.py supports only 1"):
        checks.check_parallelism(Namespace(**{**vars(local), "context_parallel_size": 2}))
    sp = Namespace(**{**vars(local), "sequence_parallel": True})
    with pytest.raises(PruneError, match="--sequence-parallel: this run builds megatron-core's local layer spec"):
        checks.check_parallelism(sp)
    monkeypatch.setattr(model_mod, "have_transformer_engine", lambda: True)  # a GPU machine with TE
    checks.check_parallelism(Namespace(**{**vars(sp), "transformer_impl": "transformer_engine"}))


def test_document_masking_needs_attention_that_applies_the_mask(monkeypatch):
    """Only megatron-core's unfused local attention applies the dataset's per-document mask: TE's causal attention
    and the fused causal softmax would ignore it (and train across documents), so those are refused."""
    from megatron.prune.training import checks
    from megatron.prune.training import model as model_mod

    local = Namespace(reset_attention_mask=True, masked_softmax_fusion=False, transformer_impl="local",
                      dataloader_inter_document_masking=False, window_size=None, bf16=True, fp16=False)
    checks.check_document_masking(local)
    with pytest.raises(PruneError, match="--reset-attention-mask: the fused causal softmax kernel ignores the "
                                         "per-document mask .* add --no-masked-softmax-fusion"):
        checks.check_document_masking(Namespace(**{**vars(local), "masked_softmax_fusion": True}))
    # in fp32 the fused kernel never runs
    checks.check_document_masking(Namespace(**{**vars(local), "masked_softmax_fusion": True, "bf16": False}))
    with pytest.raises(PruneError, match="--window-size 64: megatron-core's local attention replaces the "
                                         "per-document mask"):
        checks.check_document_masking(Namespace(**{**vars(local), "window_size": 64}))
    monkeypatch.setattr(model_mod, "have_transformer_engine", lambda: True)
    te = Namespace(**{**vars(local), "transformer_impl": "transformer_engine"})
    with pytest.raises(PruneError, match="Transformer Engine's causal attention ignores the per-document mask"):
        checks.check_document_masking(te)
    checks.check_document_masking(Namespace(**{**vars(te), "reset_attention_mask": False}))
    with pytest.raises(PruneError, match="--dataloader-inter-document-masking: pretrain_llama.py does not build"):
        checks.check_document_masking(Namespace(**{**vars(te), "dataloader_inter_document_masking": True}))


def test_flags_stock_pretrain_gpt_honours(tmp_path, inputs):
    """Megatron flags the stock GPT script acts on: the ones this recipe cannot honour are refused (not ignored),
    the rest reach the model, the dataset config and the data checks."""
    from megatron.prune.training import checks
    from megatron.prune.training import datasets
    from megatron.prune.training import model as model_mod

    base = {name: None for name, _ in checks.UNSUPPORTED_FLAGS.values()}
    checks.check_unsupported_flags(Namespace(**base, transformer_impl="local"))
    for flag, (name, _) in checks.UNSUPPORTED_FLAGS.items():
        with pytest.raises(PruneError, match=f"^{flag} .*: not supported: "):
            checks.check_unsupported_flags(Namespace(**{**base, name: True}, transformer_impl="local"))
    with pytest.raises(PruneError, match="--transformer-impl inference_optimized: for inference only"):
        checks.check_unsupported_flags(Namespace(**base, transformer_impl="inference_optimized"))
    # RoPE position interpolation: adopted from a checkpoint, checked against it, and passed to GPTModel
    assert "rotary_seq_len_interpolation_factor" in checks.UNLOADED_MODEL_ARGS  # the teacher takes its own:
    assert "rotary_seq_len_interpolation_factor" in teacher_mod.TEACHER_SHAPE_FIELDS
    rope = Namespace(padded_vocab_size=384, max_position_embeddings=64, untie_embeddings_and_output_weights=False,
                     position_embedding_type="rope", rotary_percent=1.0, rotary_base=10000,
                     rotary_seq_len_interpolation_factor=4)
    assert model_mod.gpt_model_kwargs(rope)["seq_len_interpolation_factor"] == 4
    # dataset flags reach GPTDatasetConfig
    seqs = tmp_path / "seqs.json"
    seqs.write_text(json.dumps({"a": 3}))
    tuned = datasets.dataset_tuning(Namespace(multiple_validation_sets=True, mid_level_dataset_surplus=0.5,
                                            allow_ambiguous_pad_tokens=True, per_dataset_sequences_path=str(seqs)))
    assert tuned["multiple_validation_sets"] and tuned["allow_ambiguous_pad_tokens"]
    assert tuned["mid_level_dataset_surplus"] == 0.5 and tuned["sequences_per_dataset"] == {"a": 3}
    with pytest.raises(PruneError, match=r"--per-dataset-sequences-path .*nope\.json: No such file"):
        datasets.read_sequence_counts(str(tmp_path / "nope.json"))
    seqs.write_text("[3]")
    with pytest.raises(PruneError, match=r"seqs\.json: must hold a JSON object .*, not list"):
        datasets.read_sequence_counts(str(seqs))
    seqs.write_text("{")
    with pytest.raises(PruneError, match=r"seqs\.json: not JSON"):
        datasets.read_sequence_counts(str(seqs))
    # --data-args-path (a long blend kept in a file) is read as the dataset provider reads it
    blend = tmp_path / "blend.txt"
    blend.write_text(f"0.7 {inputs['DATA']}\n0.3 {inputs['DATA']}_b\n")
    none = dict(data_path=None, train_data_path=None, valid_data_path=None, test_data_path=None,
                per_split_data_args_path=None)
    assert checks.data_prefixes(Namespace(**none, data_args_path=str(blend))) == [inputs["DATA"], inputs["DATA"] + "_b"]
    with pytest.raises(PruneError, match=r"--data-args-path .*nope\.txt: no such file"):
        checks.data_prefixes(Namespace(**none, data_args_path=str(tmp_path / "nope.txt")))
    with pytest.raises(PruneError, match="--data-args-path .* and --data-path: give one"):
        checks.data_prefixes(Namespace(**{**none, "data_path": [inputs["DATA"]]}, data_args_path=str(blend)))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": inputs["DATA"]}))
    with pytest.raises(PruneError, match="split.json: no test, valid entry"):
        checks.data_prefixes(Namespace(**{**none, "per_split_data_args_path": str(split)}, data_args_path=None))
    split.write_text(json.dumps({"train": f"1 {inputs['DATA']}", "valid": inputs["DATA"] + "_v",
                                 "test": inputs["DATA"] + "_t"}))
    assert checks.data_prefixes(Namespace(**{**none, "per_split_data_args_path": str(split)}, data_args_path=None)) \
        == [inputs["DATA"], inputs["DATA"] + "_v", inputs["DATA"] + "_t"]


def test_gpu_diagnostic_and_te_flags_reach_megatron_core(monkeypatch):
    """Flags the stock GPT script honours on a GPU: --use-te-activation-func and --use-transformer-engine-op-fuser
    reach Transformer Engine's layer spec; --record-memory-history starts the allocator history before the model is
    built (and is refused on CPU, where there is no CUDA allocator)."""
    import megatron.core.models.gpt.gpt_layer_specs as specs
    import megatron.training
    import megatron.training.utils
    from megatron.prune.training import checks
    from megatron.prune.training import model as model_mod
    from megatron.prune.training import recipe

    seen: dict[str, object] = {}
    monkeypatch.setattr(model_mod, "have_transformer_engine", lambda: True)
    monkeypatch.setattr(specs, "get_gpt_layer_with_transformer_engine_spec", lambda **kw: seen.update(kw))
    model_mod._layer_spec(Namespace(transformer_impl="transformer_engine", qk_layernorm=False,
                                 use_te_activation_func=True, use_transformer_engine_op_fuser=True), None)
    assert seen == {"qk_layernorm": False, "use_te_activation_func": True, "use_te_op_fuser": True}

    args = Namespace(record_memory_history=True, profile_ranks=[1], memory_snapshot_path="snap.pickle",
                     kd_teacher_load=None, transformer_impl="local")
    monkeypatch.setattr(megatron.training, "get_args", lambda: args)
    monkeypatch.setattr(megatron.training.utils, "start_memory_history_recording", lambda p: seen.update(vars(p)))

    def build(*_: object) -> torch.nn.Module:
        seen["history_first"] = "record_memory_history" in seen
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(recipe, "build_gpt", build)
    recipe.Recovery().model_provider()
    assert seen["history_first"] and (seen["record_memory_history"], seen["profile_ranks"],
                                    seen["memory_snapshot_path"]) == (True, [1], "snap.pickle")
    monkeypatch.setattr(checks, "shims_active", lambda: True)
    with pytest.raises(PruneError, match="--record-memory-history: records CUDA allocations, and this run has no "
                                         "GPU; drop the flag"):
        checks.check_memory_history(args)
    checks.check_memory_history(Namespace(record_memory_history=False))


def test_attention_kernel_of_the_local_spec(monkeypatch):
    """Which core attention the local spec gets: torch SDPA by default on a GPU (not under --deterministic-mode),
    megatron-core's unfused module by default on CPU; --attention-backend names either one explicitly."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnBackend

    from megatron.prune.training import attention
    from megatron.prune.training import model as model_mod

    def core(**kw: object) -> type:
        args = Namespace(transformer_impl="local", qk_layernorm=False, normalization="RMSNorm", **kw)
        return model_mod._layer_spec(args, None).submodules.self_attention.submodules.core_attention

    monkeypatch.setattr(attention, "on_gpu", lambda: False)
    assert core(attention_backend=AttnBackend.auto) is DotProductAttention
    assert core(attention_backend=AttnBackend.flash) is core(attention_backend=AttnBackend.fused) \
        is attention.SDPAttention
    monkeypatch.setattr(attention, "on_gpu", lambda: True)
    assert core(attention_backend=AttnBackend.auto, deterministic_mode=False) is attention.SDPAttention
    assert core(attention_backend=AttnBackend.auto, deterministic_mode=True) is DotProductAttention
    assert core(attention_backend=AttnBackend.unfused) is DotProductAttention
    assert model_mod.spec_description(Namespace(transformer_impl="local", attention_backend=AttnBackend.auto)) \
        == "local spec, torch SDPA attention"


def test_partial_loads_are_refused():
    from megatron.prune.training.model import refuse_partial_loads

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    refuse_partial_loads(model)
    full = model.state_dict()
    model.load_state_dict(full)
    model.load_state_dict({**full, "1._extra_state": torch.zeros(1)}, strict=False)  # TE metadata may differ
    renamed = {("1.w" if k == "1.weight" else k): v for k, v in full.items()}
    with pytest.raises(PruneError, match=r"1 missing \['1.weight'\], 1 unexpected \['1.w'\]"):
        model.load_state_dict(renamed, strict=False)  # what the stock loader's fallback does


# ---- bad input ----------------------------------------------------------------------------------
def test_bad_inputs_fail_before_training(runs):
    ok(runs["driver"])
    bad = [c for c in runs["cases"] if c["message"]]
    assert len(bad) == 14
    for case in bad:
        r = case_result(case)
        assert r.returncode == 2 and case["message"] in r.stderr, (case["name"], r.stderr[-3000:])
        assert not parse_losses(r.stdout), f"{case['name']}: training started despite bad input"


def test_checkpoint_reads_are_memory_mapped(tmp_path):
    """Reading a shard's args (done for --load and the teacher on every rank) maps the file instead of reading
    every tensor into RAM; a legacy (non-zip) file is still read."""
    from megatron.prune.io.memory import file_mappings

    state = {"model": {"w": torch.arange(4096.0)}, "args": Namespace(num_layers=2)}
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    loaded = read.load_shard(tmp_path / "zip.pt")
    ptr = loaded["model"]["w"].data_ptr()
    assert any(lo <= ptr < hi for lo, hi in file_mappings(tmp_path / "zip.pt"))
    legacy = read.load_shard(tmp_path / "legacy.pt")
    assert legacy["args"].num_layers == 2 and torch.equal(legacy["model"]["w"], state["model"]["w"])
    assert not file_mappings(tmp_path / "legacy.pt")


def test_teacher_checks():
    student = Namespace(tensor_model_parallel_size=2, padded_vocab_size=384, pipeline_model_parallel_size=1)
    teacher_mod.check_teacher(Namespace(tensor_model_parallel_size=2, padded_vocab_size=384), student)
    with pytest.raises(PruneError, match="TP=1"):
        teacher_mod.check_teacher(Namespace(tensor_model_parallel_size=1, padded_vocab_size=384), student)
    with pytest.raises(PruneError, match="padded vocab 320"):
        teacher_mod.check_teacher(Namespace(tensor_model_parallel_size=2, padded_vocab_size=320), student)
    # the same padded size, but 300 vs 290 tokens (our checkpoints record both; a stock one may have no vocab_size)
    teacher = Namespace(tensor_model_parallel_size=2, padded_vocab_size=384, vocab_size=300)
    with pytest.raises(PruneError, match="teacher's vocabulary has 300 tokens, the student's .--load. 290"):
        teacher_mod.check_teacher(teacher, student, student_ckpt_args=Namespace(vocab_size=290))
    teacher_mod.check_teacher(teacher, student, student_ckpt_args=Namespace(vocab_size=300))
    teacher_mod.check_teacher(teacher, student, student_ckpt_args=Namespace(vocab_size=None))


def test_teacher_layout_checks():
    """A torch-format teacher must match the student's TP and PP (one reshard command names both); torch_dist
    reshards on load. At PP > 1 the teacher's layers must split evenly, and virtual pipelines are refused."""
    student = Namespace(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, padded_vocab_size=384,
                        kd_teacher_load="/t/", virtual_pipeline_model_parallel_size=None)
    teacher = Namespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, padded_vocab_size=384,
                        num_layers=4)
    with pytest.raises(PruneError, match=r"saved at TP=1, PP=1, the student runs at TP=2, PP=2; reshard the teacher: "
                                         r"megatron-prune reshard --input /t/ --output /t-tp2-pp2 --tp 2 --pp 2$"):
        teacher_mod.check_teacher(teacher, student)
    teacher_mod.check_teacher(teacher, student, teacher_torch_dist=True)
    teacher_mod.check_teacher(Namespace(**{**vars(teacher), "tensor_model_parallel_size": 2,
                                  "pipeline_model_parallel_size": 2}), student)
    with pytest.raises(PruneError, match="the teacher's 3 layers do not split evenly over PP=2 stages"):
        teacher_mod.check_teacher(Namespace(**{**vars(teacher), "num_layers": 3}), student, teacher_torch_dist=True)
    with pytest.raises(PruneError, match="virtual pipeline"):
        teacher_mod.check_teacher(teacher, Namespace(**{**vars(student), "virtual_pipeline_model_parallel_size": 2}),
                         teacher_torch_dist=True)


def test_checkpoint_tokenizer_must_be_the_training_tokenizer(inputs):
    """A checkpoint's hf_meta/ tokenizer against --tokenizer-model: the same vocabulary passes, another is refused
    naming the fix (for a teacher: `vocab prune --like`), no hf_meta/ tokenizer goes unchecked."""
    from megatron.prune.training import checks

    vp = inputs["vocab_pruned"]
    args = Namespace(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=vp["TOKENIZER"])
    checks.check_vocabulary(str(vp["mg"]), args, "--load")
    checks.check_vocabulary(str(vp["teacher_v"]), args, "--kd-teacher-load")
    checks.check_vocabulary(str(inputs["conv"][1]), args, "--kd-teacher-load")  # hf_meta/ without a tokenizer
    with pytest.raises(PruneError, match=r"300 tokens\) is not the training tokenizer .* 290 tokens; 300 vs 290"):
        checks.check_vocabulary(str(vp["teacher_full"]), args, "--kd-teacher-load")
    full = Namespace(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=inputs["TOKENIZER"])
    fix = f"tokenize the data with it and pass it as --tokenizer-model (TOKENIZER={vp['mg']}/hf_meta)"
    with pytest.raises(PruneError, match=re.escape(fix)):
        checks.check_vocabulary(str(vp["mg"]), full, "--load")
    checks.check_vocabulary(str(vp["mg"]), Namespace(tokenizer_type="NullTokenizer", tokenizer_model=None), "--load")


# ---- vocab-parallel KL (and LM loss) vs plain torch at TP=2, and what they keep for backward ----------
# (one torchrun group; this file is the worker)
def _kl_worker(out: str) -> None:
    import torch.nn.functional as F

    from megatron.core import parallel_state
    from megatron.prune.cpu import init_parallel

    init_parallel(tp=2)
    rank, group = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_group()
    g = torch.Generator().manual_seed(0)
    s_full = torch.randn(3, 5, 40, generator=g, dtype=torch.float64) * 3
    t_full = torch.randn(3, 5, 40, generator=g, dtype=torch.float64) * 3
    w = torch.rand(3, 5, generator=g, dtype=torch.float64)
    T = 2.0
    shard = slice(rank * 20, (rank + 1) * 20)
    s_local = s_full[..., shard].clone().requires_grad_(True)
    kl = kd.vocab_parallel_kl(s_local, t_full[..., shard], T, group)
    (kl * w).sum().backward()
    s_ref = s_full.clone().requires_grad_(True)
    ref = F.kl_div(F.log_softmax(s_ref / T, -1), F.log_softmax(t_full / T, -1), log_target=True,
                   reduction="none").sum(-1)
    (ref * w).sum().backward()
    torch.testing.assert_close(kl, ref.detach())
    torch.testing.assert_close(s_local.grad, s_ref.grad[..., shard])
    same = kd.vocab_parallel_kl(t_full[..., shard], t_full[..., shard], T, group)
    assert torch.equal(same, torch.zeros_like(same))
    assert kl.min() > 0
    # memory: the KL keeps one vocab-sized tensor for backward (q - p); at alpha 1 the LM loss keeps none
    from torch.autograd.graph import saved_tensors_hooks

    labels = torch.randint(0, 40, (3, 5), generator=g)

    def distill(alpha: float) -> tuple[torch.Tensor, int]:
        sizes: list[int] = []
        x = s_full[..., shard].float().requires_grad_(True)
        with saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t, lambda t: t):
            out = kd.distill_losses(x, t_full[..., shard].float(), labels, alpha, T, group)
        return out, sum(sizes)

    (only_kd, kept_kd), (mixed, kept_mixed) = distill(1.0), distill(0.5)
    one = s_local.numel() * 4
    assert kept_kd == one and kept_mixed > 2 * one, (kept_kd, kept_mixed, one)
    assert torch.equal(only_kd, mixed)
    lm_ref = F.cross_entropy(s_full.float().reshape(-1, 40), labels.reshape(-1), reduction="none").reshape(3, 5)
    torch.testing.assert_close(only_kd[0], lm_ref)
    torch.testing.assert_close(only_kd[1], ref.detach().float())
    Path(f"{out}.{rank}").write_text(json.dumps({"ok": True, "kl": kl.tolist()}))


def test_kl_of_near_equal_logits_is_never_negative():
    """Rounding makes KL(p || q) of near-equal logits come out slightly negative for some tokens, and Megatron's
    log leaves out a negative loss average; the KL is clamped at 0."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(64, 4096, generator=g) * 3
    kl = kd.vocab_parallel_kl(teacher + 1e-6 * torch.randn(64, 4096, generator=g), teacher)
    assert kl.min() >= 0 and kl.max() < 1e-6


def test_vocab_parallel_kl_at_tp2_equals_plain_torch(runs, inputs):
    ok(runs["kl"])
    out = inputs["dir"] / "kl"
    a, b = (json.loads(Path(f"{out}.{i}").read_text()) for i in (0, 1))
    assert a["ok"] and b["ok"] and a["kl"] == b["kl"]


if __name__ == "__main__":
    {"kl": _kl_worker, "cases": _run_cases}[sys.argv[1]](sys.argv[2])
