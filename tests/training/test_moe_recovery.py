"""Recovery training of a pruned mixture-of-experts model (Qwen3-MoE, 6 experts pruned to 4 of half the width, 4
layers to 2) on the stock loop, on CPU: at EP=1 (one process, cases forked from one interpreter) and at EP=2 (torchrun
on 2 ranks through scripts/check_model.sh, once for the module), with the aux load-balancing loss on, distilling from
the unpruned MoE, and the saved checkpoints exported to HF and run by transformers; a pruned Mixtral the same way at
EP=1. Each MoE refusal is one line and writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.prune.errors import PruneError
from megatron.prune.training import checks, moe_checks
from megatron.prune.training import model as model_mod
from megatron.prune.training.checkpoints import saved_expert_parallel
from tests.training.recovery_harness import ROOT, case_result, driver_argv, finish, ok, parse_losses, start_check_model

VOCAB = 300
PRUNE = ["--num-experts", "4", "--moe-ffn-hidden-size", "8", "--num-layers", "2", "--method", "magnitude",
         "--no-progress"]
KD_ITERS, PLAIN_ITERS = 3, 6


def make_moe_inputs(d: Path) -> dict:
    """Tokenizer and a corpus of one 16-token document repeated (its loss falls within a few steps); the tiny
    Qwen3-MoE converted (the teacher) at EP=1 and EP=2, pruned through the CLI and resharded to EP=2; a dense
    checkpoint."""
    from transformers import AutoTokenizer

    from megatron.prune.cli import main as cli_main
    from megatron.prune.formats.mcore.ops import hf_to_megatron
    from tests.tiny import make_tiny_hf
    from tests.tiny_corpus import make_hf_tokenizer, write_ids

    tok = make_hf_tokenizer(d / "tok", vocab_size=VOCAB)
    eod = AutoTokenizer.from_pretrained(tok).eos_token_id
    doc = np.append(np.random.default_rng(0).integers(2, VOCAB, 15), eod)
    data = write_ids(d / "repeated_text_document", [doc] * 200)
    hf = make_tiny_hf(d / "hf", "qwen3-moe", vocab_size=VOCAB, num_experts=6)
    mg = hf_to_megatron(hf, d / "mg", tp=1, make_vocab_size_divisible_by=64, progress=False)
    assert cli_main(["prune", "--input", str(mg), "--output", str(d / "pruned"), *PRUNE]) == 0
    for src, out in ((mg, d / "mg_ep2"), (d / "pruned", d / "pruned_ep2")):
        assert cli_main(["reshard", "--input", str(src), "--output", str(out), "--ep", "2", "--no-progress"]) == 0
    mixtral = hf_to_megatron(make_tiny_hf(d / "mixtral_hf", "mixtral", vocab_size=VOCAB), d / "mixtral", tp=1,
                             make_vocab_size_divisible_by=64, progress=False)
    assert cli_main(["prune", "--input", str(mixtral), "--output", str(d / "mixtral_pruned"), "--num-experts", "3",
                     *PRUNE[2:]]) == 0
    dense = hf_to_megatron(make_tiny_hf(d / "dense_hf", "llama-gqa", vocab_size=VOCAB), d / "dense", tp=1,
                           make_vocab_size_divisible_by=64, progress=False)
    return {"dir": d, "TOKENIZER": str(tok), "DATA": data, "mg": mg, "mg_ep2": d / "mg_ep2", "pruned": d / "pruned",
            "pruned_ep2": d / "pruned_ep2", "dense": dense,
            "mixtral": d / "mixtral_pruned"}


def refusal(inputs: dict, name: str, *flags: str, load: Path, world: int = 1) -> tuple[str, list[str], dict]:
    """A case that must stop before training (checked as for ``world`` ranks, as check_model.sh's pre-flight does);
    it names a SAVE folder that must stay absent."""
    save = ["--save", str(inputs["dir"] / f"{name}_out"), "--save-interval", "1"]
    return name, driver_argv(inputs, *flags, *save, load=load, iters=1), {"WORLD_SIZE": str(world)}


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> dict:
    """The inputs and every run of this module: the EP=1 cases in one process beside the EP=2 torchrun."""
    d = tmp_path_factory.mktemp("moe_recovery")
    inputs = make_moe_inputs(d)
    kd = ["--kd-teacher-load", str(inputs["mg"]), "--kd-alpha", "0.5"]
    cases = [
        ("plain", driver_argv(inputs, "--save", str(d / "plain_out"), "--save-interval", str(PLAIN_ITERS),
                              load=inputs["pruned"], iters=PLAIN_ITERS), {}),
        ("no_aux", driver_argv(inputs, "--moe-aux-loss-coeff", "0", load=inputs["pruned"], iters=1), {}),
        ("kd_ep1", driver_argv(inputs, *kd, "--save", str(d / "kd_ep1_out"), "--save-interval", str(KD_ITERS),
                               load=inputs["pruned"], iters=KD_ITERS), {}),
        ("mixtral", driver_argv(inputs, "--save", str(d / "mixtral_out"), "--save-interval", "2",
                                load=inputs["mixtral"], iters=2), {}),
        refusal(inputs, "grouped_gemm", "--moe-grouped-gemm", load=inputs["pruned"]),
        refusal(inputs, "flex", "--moe-token-dispatcher-type", "flex", load=inputs["pruned"]),
        refusal(inputs, "tp2", "--tensor-model-parallel-size", "2", load=inputs["pruned"], world=2),
        refusal(inputs, "load_ep", load=inputs["pruned_ep2"]),
        refusal(inputs, "teacher_ep", "--kd-teacher-load", str(inputs["mg_ep2"]), load=inputs["pruned"]),
        refusal(inputs, "dense_experts", "--num-experts", "4", load=inputs["dense"]),
    ]
    spec = [{"name": n, "argv": a, "log": str(d / f"case_{n}"), "env": env} for n, a, env in cases]
    (d / "cases.json").write_text(json.dumps(spec))
    driver = subprocess.Popen([sys.executable, str(ROOT / "tests/training/recovery_harness.py"), "cases",
                               str(d / "cases.json")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    ep2 = start_check_model({"DATA": inputs["DATA"], "TOKENIZER": inputs["TOKENIZER"], "EP": "2",
                             "TRAIN_ITERS": str(KD_ITERS), "LOAD": str(inputs["pruned_ep2"]),
                             "SAVE": str(d / "kd_ep2_out"), "KD_TEACHER": str(inputs["mg_ep2"]), "KD_ALPHA": "0.5",
                             "CACHE": str(d / "cache_ep2")}, "--moe-token-dispatcher-type", "alltoall")
    runs = {"ep2": finish(ep2), "driver": finish(driver)}
    runs.update({c["name"]: case_result(c) for c in spec})
    return {**inputs, "runs": runs}


def export(folder: Path, out: Path):
    """``megatron-prune convert megatron-to-hf``, then the model transformers loads from it."""
    from transformers import AutoModelForCausalLM

    from megatron.prune.cli import main as cli_main

    assert cli_main(["convert", "megatron-to-hf", "--input", str(folder), "--output", str(out), "--no-progress"]) == 0
    return AutoModelForCausalLM.from_pretrained(out).eval()


def test_pruned_moe_trains_at_ep1_with_the_aux_loss_and_exports(moe, tmp_path):
    """6 steps on a repeated document: the LM loss falls, the load-balancing loss is logged beside it (the default
    coefficient 1e-2 was applied), and the saved checkpoint exports to a 4-expert Qwen3-MoE transformers runs."""
    ok(moe["runs"]["driver"])
    r = ok(moe["runs"]["plain"])
    assert "4 experts (SequentialMLP, top-2, EP=1, allgather dispatcher), load balancing aux_loss x 0.01" in r.stdout
    lm = {k: float(v) for k, v in parse_losses(r.stdout).items()}
    balance = {k: float(v) for k, v in parse_losses(r.stdout, "load_balancing_loss").items()}
    assert sorted(lm) == sorted(balance) == list(range(1, PLAIN_ITERS + 1)), r.stdout[-2000:]
    assert all(np.isfinite(list(lm.values()))) and lm[PLAIN_ITERS] < lm[1] - 0.5, lm
    assert all(0.5 < v < 4.0 for v in balance.values()), balance  # E * sum(f_i * p_i): 1 when balanced
    model = export(moe["dir"] / "plain_out", tmp_path / "hf")
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert (model.config.num_experts, model.config.moe_intermediate_size, model.config.num_hidden_layers) == (4, 8, 2)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.randint(0, VOCAB, (2, 12))).logits).all()


def test_pruned_mixtral_trains_and_exports(moe, tmp_path):
    """Mixtral (no QK-norm; 4 experts pruned to 3) through the same recipe: finite losses with the aux loss beside
    them, exported to a MixtralForCausalLM transformers runs."""
    ok(moe["runs"]["driver"])
    r = ok(moe["runs"]["mixtral"])
    lm, balance = parse_losses(r.stdout), parse_losses(r.stdout, "load_balancing_loss")
    assert sorted(lm) == sorted(balance) == [1, 2] and all(np.isfinite(float(v)) for v in lm.values()), r.stdout[-2000:]
    assert all(float(v) > 0.5 for v in balance.values()), balance
    model = export(moe["dir"] / "mixtral_out", tmp_path / "hf")
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 3
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.randint(0, VOCAB, (2, 12))).logits).all()


def test_aux_loss_reaches_the_gradient(moe):
    """--moe-aux-loss-coeff 0 (megatron-core's own default): the same forward (the same LM loss), no load-balancing
    loss, and another gradient: the default run's aux loss trains the router."""
    on, off = ok(moe["runs"]["plain"]).stdout, ok(moe["runs"]["no_aux"]).stdout
    assert parse_losses(off)[1] == parse_losses(on)[1]
    assert float(parse_losses(off, "load_balancing_loss").get(1, 0.0)) == 0.0
    assert float(parse_losses(on, "load_balancing_loss")[1]) > 0.5
    assert parse_losses(off, "grad norm")[1] != parse_losses(on, "grad norm")[1]


def test_ep2_under_torchrun_trains_as_ep1(moe, tmp_path):
    """Distilling from the unpruned MoE (its experts also split over the EP ranks) at EP=2 under torchrun
    (check_model.sh EP=2, the alltoall dispatcher through gloo): each rank holds 2 of the 4 experts, and the run is
    the EP=1 run (allgather dispatcher), step for step (LM, KD and load-balancing losses), up to the exported
    weights."""
    ok(moe["runs"]["driver"])
    one, two = ok(moe["runs"]["kd_ep1"]).stdout, ok(moe["runs"]["ep2"]).stdout
    assert "4 experts (SequentialMLP, top-2, EP=2, alltoall dispatcher)" in two
    for key in ("lm loss", "kd loss", "load_balancing_loss"):
        a, b = parse_losses(one, key), parse_losses(two, key)
        assert sorted(a) == sorted(b) == list(range(1, KD_ITERS + 1)), (key, a, b)
        assert [float(v) for v in b.values()] == pytest.approx([float(v) for v in a.values()], rel=1e-4), key
    assert all(float(v) > 0 for v in parse_losses(two, "kd loss").values())
    shards = sorted(p.name for p in (moe["dir"] / "kd_ep2_out" / f"iter_{KD_ITERS:07d}").iterdir())
    assert shards == ["mp_rank_00_000", "mp_rank_00_001"]
    a = export(moe["dir"] / "kd_ep1_out", tmp_path / "ep1").state_dict()
    b = export(moe["dir"] / "kd_ep2_out", tmp_path / "ep2").state_dict()
    assert a.keys() == b.keys() and any(".experts." in k for k in a)
    source = export(moe["pruned"], tmp_path / "pruned").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not all(torch.equal(a[k], source[k]) for k in a)  # trained


@pytest.mark.parametrize("name,message", [
    ("grouped_gemm", "--moe-grouped-gemm: megatron-core's local spec (the one this run builds) has no grouped GEMM"),
    ("flex", "--moe-token-dispatcher-type flex: runs on DeepEP or HybridEP kernels, which need a GPU"),
    ("tp2", ("--tensor-model-parallel-size 2 with a mixture-of-experts model: megatron-core's MoE layer trains at "
             "TP > 1 only with --sequence-parallel")),
    ("load_ep", ("the checkpoint was saved at expert-parallel size 2, the run uses --expert-model-parallel-size 1; "
                 "reshard it: megatron-prune reshard --input {pruned_ep2} --output {pruned_ep2}-ep1 --ep 1")),
    ("teacher_ep", "error: --kd-teacher-load {mg_ep2}: the checkpoint was saved at expert-parallel size 2"),
    ("dense_experts", ("error: --load {dense}: a dense checkpoint (no experts), but the flags build a "
                       "mixture-of-experts model (--num-experts 4); drop --num-experts")),
])
def test_moe_refusals_are_one_line_and_write_nothing(moe, name, message):
    """Each MoE refusal stops before start-up with exit code 2 and one error line, and writes no SAVE folder."""
    ok(moe["runs"]["driver"])
    r = moe["runs"][name]
    errors = [line for line in r.stderr.splitlines() if line.startswith("pretrain_llama.py: error:")]
    assert r.returncode == 2 and len(errors) == 1, (r.returncode, r.stderr[-3000:])
    assert message.format(**moe) in errors[0], errors
    assert not (moe["dir"] / f"{name}_out").exists()


def test_moe_checks():
    """The checks behind the refusals, on args alone: MoE shape against a checkpoint, the EP a torch-format
    checkpoint was saved at, TE's MoE layers, and the default aux-loss coefficient."""
    ck = Namespace(num_experts=4, moe_ffn_hidden_size=8, moe_router_topk=2, moe_router_pre_softmax=False,
                   moe_router_score_function="softmax", moe_shared_expert_intermediate_size=None,
                   expert_model_parallel_size=2)
    run = Namespace(**{**vars(ck), "expert_model_parallel_size": 1, "load": "ck"})
    moe_checks.check_moe_shape(ck, run, "--load")
    with pytest.raises(PruneError, match=r"moe_router_topk: checkpoint 2 vs flags 1\)"):
        moe_checks.check_moe_shape(ck, Namespace(**{**vars(run), "moe_router_topk": 1}), "--load")
    moe_checks.check_moe_shape(Namespace(num_experts=None), Namespace(num_experts=None, load="ck"), "--load")  # dense
    with pytest.raises(PruneError, match="a mixture-of-experts checkpoint .4 experts., but the flags build a dense"):
        moe_checks.check_moe_shape(ck, Namespace(num_experts=None, load="ck"), "--load")
    assert saved_expert_parallel(ck) == 2 and saved_expert_parallel(Namespace(num_experts=None)) == 1
    with pytest.raises(PruneError, match="reshard --input ck --output ck-ep1 --ep 1$"):
        moe_checks.check_expert_parallel(ck, run, "--load", "ck", torch_dist=False)
    moe_checks.check_expert_parallel(ck, run, "--load", "ck", torch_dist=True)  # torch_dist reshards on load
    moe_te = Namespace(num_experts=4, transformer_impl="transformer_engine", moe_token_dispatcher_type="alltoall")
    moe_checks.check_moe(moe_te)  # TE not installed here: the local spec is built
    with pytest.raises(PruneError, match="--tensor-model-parallel-size 2 with a mixture-of-experts model"):
        moe_checks.check_moe(Namespace(**vars(moe_te), tensor_model_parallel_size=2))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_mod, "have_transformer_engine", lambda: True)
        with pytest.raises(PruneError, match="local spec only .*pass --transformer-impl local$"):
            moe_checks.check_moe(moe_te)
        moe_checks.check_moe(Namespace(num_experts=None, transformer_impl="transformer_engine",
                                   moe_token_dispatcher_type="flex"))
        moe_checks.check_moe_flags_first(checks.preflight_flags(["--moe-grouped-gemm"]))  # TE builds grouped GEMM
    with pytest.raises(PruneError, match="converts to SequentialMLP ones: megatron-prune reshard --input CKPT "
                                         "--output CKPT-local --transformer-impl local"):
        moe_checks.check_moe_flags_first(checks.preflight_flags(["--moe-grouped-gemm"]))
    grouped = Namespace(transformer_impl="transformer_engine", moe_grouped_gemm=True)
    with pytest.raises(PruneError, match="--transformer-impl local .its grouped-GEMM experts become SequentialMLP"):
        checks.check_layer_spec(grouped, Namespace(transformer_impl="local"), "--load", "ck")
    for experts, balancing, given, want in [(4, "aux_loss", False, 1e-2), (4, "aux_loss", True, 0.0),
                                            (4, "sinkhorn", False, 0.0), (None, "aux_loss", False, 0.0)]:
        ns = Namespace(moe_aux_loss_coeff=0.0, num_experts=experts, moe_router_load_balancing_type=balancing)
        moe_checks.set_moe_aux_loss(ns, coeff_given=given)
        assert ns.moe_aux_loss_coeff == want, (experts, balancing, given)


def test_cpu_shim_hands_the_alltoall_dispatcher_host_split_sizes():
    """Without it gloo's all_to_all_single gets tensor split sizes (a TypeError); a GPU run gets numpy arrays from
    the device-to-host copy, and so does a CPU run now. Tensors asked for as tensors stay as they are."""
    from megatron.prune.cpu import _host_split_sizes

    splits = torch.tensor([53, 63])
    host = _host_split_sizes(splits, as_numpy=True)
    assert isinstance(host, np.ndarray) and host.tolist() == [53, 63]
    assert _host_split_sizes(splits) is splits and _host_split_sizes(None, as_numpy=True) is None
