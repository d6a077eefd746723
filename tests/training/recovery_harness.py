"""The recovery-training harness the training tests share: inputs (corpus, tokenizers, converted and pruned
checkpoints), launches of ``scripts/check_model.sh``, a driver that runs single-process cases through
``recipe.main`` in forked children, and a TP=2 KL worker. Run as a script it is one of those workers.

Start-up (~10-20 s per process) dominates, so the launches are few and two single-process ones run side by side
(see :func:`start_runs`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from megatron.prune.training import kd
from tests.procs import free_port
from tests.tiny import LLAMA3_ROPE
from tests.tiny_corpus import make_hf_tokenizer, make_spm_tokenizer, pydoc_documents, write_ids, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
ITER_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*")
# the pruned target of the tiny llama-gqa model (hidden 48, 8 heads / 4 groups, ffn 64, 4 layers)
PRUNE_FLAGS = ["--hidden-size", "40", "--num-attention-heads", "4", "--num-query-groups", "2",
               "--ffn-hidden-size", "32", "--num-layers", "3", "--method", "magnitude", "--no-progress"]
VOCAB, DIVISIBLE_BY = 300, 192  # padded vocab 384 at TP=1 and TP=2: the same model at both TPs
SPM_VOCAB = 200
TIED_PRUNE = ["--hidden-size", "40", "--ffn-hidden-size", "32", "--num-layers", "3", "--method", "magnitude",
              "--ckpt-format", "torch_dist", "--no-progress"]


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


def make_inputs(d: Path) -> dict:
    """Corpus + tokenizer, converted TP=1/TP=2 checkpoints, and those pruned with one plan, in ``d``."""
    from transformers import AutoTokenizer

    from megatron.prune.cli import main as cli_main
    from megatron.prune.data import preprocess
    from megatron.prune.formats.mcore.ops import hf_to_megatron, reshard
    from megatron.prune.vocab import prune_hf_vocab, prune_megatron_vocab
    from megatron.prune.vocab.folder import tokenizer_tokens
    from tests.tiny import make_tiny_hf

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
    # Qwen3 (QK-norm): converted, and pruned like the LLaMA above; the pruned one distils from the converted one
    qwen3 = hf_to_megatron(make_tiny_hf(d / "qwen3_hf", "qwen3", vocab_size=VOCAB), d / "qwen3_tp1", tp=1,
                           make_vocab_size_divisible_by=DIVISIBLE_BY, progress=False)
    assert cli_main(["prune", "--input", str(qwen3), "--output", str(d / "qwen3_pruned"), *PRUNE_FLAGS]) == 0
    shutil.copytree(conv[1], d / "in_place")  # trained where it lies (LOAD == SAVE)
    nan = shutil.copytree(conv[1], d / "nan_weights")  # a NaN final norm: every loss is NaN
    for f in nan.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        state = torch.load(f, weights_only=False)
        state["model"]["decoder.final_layernorm.weight"].fill_(float("nan"))
        torch.save(state, f)
    truncated = shutil.copytree(conv[1], d / "truncated_shard")  # a copy that stopped halfway
    for f in truncated.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        os.truncate(f, f.stat().st_size // 2)
    shutil.copy(s.idx_path, d / "cut_text_document.idx")  # a dataset whose .bin stops early
    (d / "cut_text_document.bin").write_bytes(s.bin_path.read_bytes()[:1000])
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
            "te": te, "te_unnamed": unnamed, "rope": rope, "qwen3": {"mg": qwen3, "pruned": d / "qwen3_pruned"},
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
                os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                                   **case.get("env", {})})  # a case's env wins (e.g. WORLD_SIZE for a pre-flight)
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
        ("qwen3_kd", driver_argv(inputs, "--kd-teacher-load", str(inputs["qwen3"]["mg"]), "--kd-alpha", "0.5",
                                 "--save", str(d / "qwen3_out"), "--save-interval", "2",
                                 load=inputs["qwen3"]["pruned"]), None),
        ("tied_pp1", driver_argv(inputs, iters=1, load=inputs["tied"][1]), None),
        ("one_document", driver_argv({**inputs, "DATA": inputs["repeated"]}, "--seq-length", "16", iters=1,
                                     load=inputs["tied"][1]), None),
        ("two_documents_masked", driver_argv({**inputs, "DATA": inputs["repeated"]}, "--reset-attention-mask",
                                             "--reset-position-ids", iters=1, load=inputs["tied"][1]), None),
        # past the pre-start scan (as after check_model.sh's pre-flight): the first iteration's loss check stops it
        ("nan_loss", driver_argv(inputs, "--save", str(d / "nan_out"), "--save-interval", "1", load=d / "nan_weights",
                                 iters=1), None),
        ("nan_weights", driver_argv(inputs, load=d / "nan_weights"),
         f"--load {d / 'nan_weights'}/iter_0000000/mp_rank_00/model_optim_rng.pt: decoder.final_layernorm.weight "
         "holds 48 NaN and 0 Inf value(s)"),
        ("truncated_shard", driver_argv(inputs, load=d / "truncated_shard"),
         f"cannot read Megatron shard {d / 'truncated_shard'}/iter_0000000/mp_rank_00/model_optim_rng.pt"),
        ("truncated_bin", driver_argv({**inputs, "DATA": str(d / "cut_text_document")}, load=pruned[1]),
         f"data prefix {d / 'cut_text_document'}: {d / 'cut_text_document'}.bin is truncated (1000 bytes"),
        ("missing_sequence_counts", driver_argv(inputs, "--per-dataset-sequences-path", str(d / "counts.json"),
                                                load=pruned[1]),
         f"--per-dataset-sequences-path {d / 'counts.json'}: No such file or directory"),
        ("other_schedule", [*driver_argv(inputs, "--lr", "0", "--min-lr", "0", iters=3), "--load",
                            str(d / "conv_tp1_out"), "--use-checkpoint-args",
                            "--no-use-tokenizer-model-from-checkpoint-args"],
         f"--load {d / 'conv_tp1_out'}: the saved learning-rate schedule differs from this run's flags ("),
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
    spec = [{"name": n, "argv": a, "log": str(d / f"case_{n}"), "message": m,
             "env": {"MEGATRON_PRUNE_PREFLIGHT": "done"} if n == "nan_loss" else {}} for n, a, m in cases]
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


def start_runs(inputs: dict) -> dict:
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


if __name__ == "__main__":
    {"kl": _kl_worker, "cases": _run_cases}[sys.argv[1]](sys.argv[2])
