"""Recovery training through ``scripts/check_model.sh`` → ``pretrain_llama.py`` → stock ``pretrain``.

CPU (gloo + shims), tiny LLaMA-like model. Proves: loss decreases (TP=1, TP=2); save then resume
gives the continuous run's losses exactly (torch and torch_dist formats); the vocab-parallel KL at
TP=2 equals a plain-torch KL on gathered logits (values and gradients); KD with teacher == student
and alpha 1 gives KD loss 0 inside the real loop; bad inputs fail before training.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from megatron.prune.shape import PruneError
from megatron.prune.training import kd
from tests.tiny_corpus import make_hf_tokenizer, pydoc_documents, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SHAPE = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
         "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
         "--make-vocab-size-divisible-by", "64", "--use-cpu-initialization"]
ITER_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_losses(log: str, key: str = "lm loss") -> dict[int, str]:
    """iteration -> the loss exactly as the stock loop printed it."""
    out = {}
    for m in ITER_RE.finditer(log):
        found = re.search(rf"\| {key}: ([0-9.E+\-]+) \|", m.group(0))
        if found:
            out[int(m.group(1))] = found.group(1)
    return out


def check_model(env: dict[str, str], *extra: str, timeout: int = 600,
                shape: tuple[str, ...] = tuple(SHAPE)) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, "MASTER_PORT": str(_free_port()),
            "SEQ_LEN": "32", "MICRO_BATCH": "2", "GLOBAL_BATCH": "4", "LR": "3e-3", **env}
    return subprocess.run(["bash", str(ROOT / "scripts/check_model.sh"), *shape, *extra], env=full,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from megatron.prune.data import preprocess

    d = tmp_path_factory.mktemp("recovery")
    tok = make_hf_tokenizer(d / "tok")
    src = write_jsonl(d / "c.jsonl", pydoc_documents(120, 4000))
    s = preprocess(src, d / "c", tok, progress=False)
    return {"dir": d, "TOKENIZER": str(tok), "DATA": str(s.bin_path)[: -len(".bin")]}


def _weights(save: Path, fmt: str) -> dict[str, torch.Tensor] | None:
    """Model tensors of iteration 10 (all TP ranks), keyed by (rank file, name)."""
    folder = save / "iter_0000010"
    if fmt == "torch_dist":  # reading it back needs a process group: compared via losses only
        return None
    out = {}
    for f in sorted(folder.glob("mp_rank_*/model_optim_rng.pt")):
        model = torch.load(f, map_location="cpu", weights_only=False)["model"]
        out.update({f"{f.parent.name}/{k}": v for k, v in model.items() if isinstance(v, torch.Tensor)})
    return out


def _train_then_resume(corpus, tp: int, fmt: str) -> dict:
    save, resave = corpus["dir"] / f"ckpt_tp{tp}_{fmt}", corpus["dir"] / f"resumed_tp{tp}_{fmt}"
    base = {"DATA": corpus["DATA"], "TOKENIZER": corpus["TOKENIZER"], "TP": str(tp),
            "TRAIN_ITERS": "10", "CKPT_FORMAT": fmt}
    full = check_model({**base, "SAVE": str(save), "SAVE_INTERVAL": "5"})
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    # resume from iteration 5 of that run (LOAD == SAVE: a resume, not a finetune); the extra
    # --save (later flags win) keeps the continuous run's iteration-10 checkpoint for comparison
    resumed = check_model({**base, "LOAD": str(save), "SAVE": str(save)}, "--ckpt-step", "5",
                          "--save", str(resave))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {"save": save, "full": parse_losses(full.stdout), "resumed": parse_losses(resumed.stdout),
            "full_norms": parse_losses(full.stdout, "grad norm"),
            "resumed_norms": parse_losses(resumed.stdout, "grad norm"),
            "same_weights": None if fmt == "torch_dist" else _same(_weights(save, fmt), _weights(resave, fmt))}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a is not b and len(a) > 5 and a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tp1(corpus):
    return _train_then_resume(corpus, 1, "torch")


@pytest.fixture(scope="module")
def tp2(corpus):
    return _train_then_resume(corpus, 2, "torch_dist")


@pytest.mark.parametrize("run", ["tp1", "tp2"])
def test_loss_decreases_and_resume_matches_continuous_run(run, request):
    r = request.getfixturevalue(run)
    full, resumed = r["full"], r["resumed"]
    assert sorted(full) == list(range(1, 11)), full
    assert float(full[10]) < float(full[1]) - 0.3, full
    assert sorted(resumed) == list(range(6, 11)), resumed
    assert r["same_weights"] is not False, "resumed run ended with different weights than the continuous run"
    assert r["resumed_norms"] == {i: r["full_norms"][i] for i in range(6, 11)}
    assert {i: resumed[i] for i in (6, 8, 9, 10)} == {i: full[i] for i in (6, 8, 9, 10)}
    # stock-loop logging quirk: a process's 2nd logged iteration prints the mean of its first two
    assert float(resumed[7]) == pytest.approx((float(full[6]) + float(full[7])) / 2, abs=2e-6)


def test_checkpoint_layout_is_megatrons(tp1):
    folder = tp1["save"] / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(folder, map_location="cpu", weights_only=False)
    assert state["args"].num_layers == 2 and state["iteration"] == 10
    assert (tp1["save"] / "latest_checkpointed_iteration.txt").read_text().strip() == "10"


def test_kd_teacher_equal_to_student_gives_zero_kd_loss_at_tp2(corpus, tp2):
    r = check_model({"DATA": corpus["DATA"], "TOKENIZER": corpus["TOKENIZER"], "TP": "2",
                     "TRAIN_ITERS": "3", "LOAD": str(tp2["save"]), "KD_TEACHER": str(tp2["save"]),
                     "KD_ALPHA": "1", "CKPT_FORMAT": "torch_dist"}, "--weight-decay", "0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    kd_losses, lm = parse_losses(r.stdout, "kd loss"), parse_losses(r.stdout, "lm loss")
    assert sorted(kd_losses) == [1, 2, 3] and all(float(v) == 0.0 for v in kd_losses.values()), kd_losses
    # finetune from the iteration-10 weights: the LM loss starts where the trained run ended
    assert float(lm[1]) < float(tp2["full"][1]) - 0.3, (lm, tp2["full"])


def test_bad_inputs_fail_before_training(corpus, tp1):
    base = {"DATA": corpus["DATA"], "TOKENIZER": corpus["TOKENIZER"], "TRAIN_ITERS": "2"}
    cases = [
        ({**base, "DATA": str(corpus["dir"] / "nope_text_document")}, (), "nope_text_document.bin"),
        ({**base, "LOAD": str(tp1["save"])}, ("--hidden-size", "96"), "hidden_size: checkpoint 64"),
        ({**base, "KD_TEACHER": str(corpus["dir"] / "missing")}, (), "--kd-teacher-load"),
    ]
    for env, extra, message in cases:
        r = check_model(env, *extra)
        assert r.returncode != 0 and message in r.stderr, r.stderr[-3000:]
        assert not parse_losses(r.stdout), "training started despite bad input"


def test_converted_checkpoint_loads_with_finetune(corpus):
    """hf_to_megatron's checkpoint + --use-checkpoint-args --finetune, no shape flags: with LR 0 the
    weights the loop saves are exactly the converted ones (so every tensor was loaded)."""
    from megatron.prune.megatron_ckpt import hf_to_megatron
    from tests.tiny import make_tiny_hf

    d = corpus["dir"]
    hf = make_tiny_hf(d / "hf", "llama-gqa", vocab_size=300)
    mg = hf_to_megatron(hf, d / "mg", tp=1, make_vocab_size_divisible_by=64, progress=False)
    out = d / "mg_finetuned"
    r = check_model({"DATA": corpus["DATA"], "TOKENIZER": corpus["TOKENIZER"], "TRAIN_ITERS": "2",
                     "LOAD": str(mg), "SAVE": str(out), "LR": "0", "MIN_LR": "0"}, shape=())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(parse_losses(r.stdout)) == [1, 2]
    src = torch.load(next(Path(mg).glob("iter_*/mp_rank_00/model_optim_rng.pt")), weights_only=False)["model"]
    got = torch.load(out / "iter_0000002/mp_rank_00/model_optim_rng.pt", weights_only=False)["model"]
    names = [k for k, v in src.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")]
    assert len(names) > 10 and all(torch.equal(src[k], got[k]) for k in names)


def test_teacher_checks():
    student = Namespace(tensor_model_parallel_size=2, padded_vocab_size=384, pipeline_model_parallel_size=1)
    kd.check_teacher(Namespace(tensor_model_parallel_size=2, padded_vocab_size=384), student)
    with pytest.raises(PruneError, match="TP=1"):
        kd.check_teacher(Namespace(tensor_model_parallel_size=1, padded_vocab_size=384), student)
    with pytest.raises(PruneError, match="padded vocab 320"):
        kd.check_teacher(Namespace(tensor_model_parallel_size=2, padded_vocab_size=320), student)


# ---- vocab-parallel KL vs plain torch at TP=2 (one torchrun group; this file is the worker) ----
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
    Path(f"{out}.{rank}").write_text(json.dumps({"ok": True, "kl": kl.tolist()}))


def test_vocab_parallel_kl_at_tp2_equals_plain_torch(tmp_path):
    out = str(tmp_path / "kl")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(_free_port()), __file__, out],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = (json.loads(Path(f"{out}.{i}").read_text()) for i in (0, 1))
    assert a["ok"] and b["ok"] and a["kl"] == b["kl"]


if __name__ == "__main__":
    _kl_worker(sys.argv[1])
