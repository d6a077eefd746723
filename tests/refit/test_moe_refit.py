"""The refit of mixture-of-experts layers (Qwen3-MoE, Mixtral): the router and each kept expert's linears, exact where
a dropped expert channel is a combination of kept ones, the default with activation selection, what the written
model gives the loss it reports, and the Megatron path (TP, EP) equal to the HF path tensor for tensor."""

from __future__ import annotations

import copy

import pytest
import torch

from compare import assert_same_tensors, calib_loss, hf_tensors, prune_cli
from megatron.prune.cli import main
from megatron.prune.core.plan import LayerPlan, PrunePlan
from megatron.prune.core.shape import shape_from_hf_config
from megatron.prune.core.slicing import layer_index
from megatron.prune.refit.layer import Call, refit_layer, run_teacher
from megatron.prune.refit.sequential import pruned_layer, student_config
from tiny import MOE_FAMILIES, make_tiny_model, silence_expert

MOE = sorted(MOE_FAMILIES)
FLAGS = ["--hidden-size", "40", "--num-attention-heads", "4", "--num-query-groups", "2", "--num-experts", "2",
         "--moe-ffn-hidden-size", "12", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]


def layer_calls(family: str, dead: int | None = None) -> tuple[torch.nn.Module, list[Call], object]:
    """Layer 0 of a tiny MoE model (4 experts of 16 channels, top-2) and its calls on 3 random batches; with ``dead``,
    an expert the router never picks (:func:`tiny.silence_expert`)."""
    model = make_tiny_model(family, seed=3)
    if dead is not None:
        silence_expert(model, dead)
    body, g, calls = model.model, torch.Generator().manual_seed(4), []
    for _ in range(3):
        h = body.embed_tokens(torch.randint(0, 96, (2, 16), generator=g))
        pos = torch.arange(16)[None].expand(2, 16)
        calls.append(Call(h.detach(), {"position_embeddings": body.rotary_emb(h, pos), "attention_mask": None,
                                       "position_ids": pos}))
    return body.layers[0], calls, model.config


@pytest.mark.parametrize("family", MOE)
def test_an_expert_channel_that_is_a_combination_of_kept_ones_is_removed_exactly(family):
    """In every expert, FFN channel 5 = 2 x channel 3 (same gate row, twice the up row). Dropping it changes the
    block's output when sliced, not once the expert's down_proj is refit; the router, reading unpruned inputs, refits
    to itself (routing unchanged)."""
    teacher, calls, config = layer_calls(family)
    with torch.no_grad():
        gu = teacher.mlp.experts.gate_up_proj  # [E, 2F, h]: gate rows, then up rows
        F = gu.shape[1] // 2
        gu[:, 5] = gu[:, 3]
        gu[:, F + 5] = 2 * gu[:, F + 3]
    cfg = {**config.to_dict(), "architectures": config.architectures}
    s = shape_from_hf_config(cfg)
    kept_ffn = tuple(c for c in range(F) if c != 5)
    lp = LayerPlan(0, tuple(range(s.num_query_groups)), tuple(range(s.num_attention_heads)), (), tuple(range(4)),
                   (kept_ffn,) * 4)
    plan = PrunePlan(s, s.replace(moe_ffn_hidden_size=F - 1, num_layers=1), tuple(range(s.hidden_size)), (lp,))
    index, experts = layer_index(plan, lp), [layer_index(plan, lp, k) for k in range(4)]
    student = pruned_layer(teacher, student_config(config, plan), 0, index, s.head_dim, 1.0, experts)
    sliced = copy.deepcopy(student)
    run = run_teacher(teacher, calls, index, s.head_dim)
    out, report = refit_layer(student, teacher, calls, run, index, s.head_dim, ("gate_up", "down"), 1e-9,
                              experts=experts)
    assert set(report.groups) == {"router", "gate_up", "down"}
    with torch.no_grad():
        want = [teacher(c.hidden, **c.kwargs) for c in calls]
        before = [sliced(c.hidden, **c.kwargs) for c in calls]
        again = [student(c.hidden, **c.kwargs) for c in calls]  # the refit's outputs are its stock forward's
    for o, a, w, b in zip(out, again, want, before):
        assert (b - w).abs().max() > 1e-2  # slicing alone changes the output
        torch.testing.assert_close(o, w, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a, o, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(student.mlp.gate.weight, sliced.mlp.gate.weight, atol=1e-4, rtol=1e-4)
    assert report.groups["down"].refit < 1e-6 < report.groups["down"].sliced


@pytest.mark.parametrize("family", MOE)
def test_moe_refit_is_the_default_and_writes_the_model_it_reports(moe_tok, tmp_path, family):
    """Activation selection refits a MoE model by default: every refit linear's error falls, the router and each
    kept expert's gate, up and down change (nothing else in the layers), and the written model gives the calibration
    loss the refit reports (each expert's tensors written where the store put them)."""
    src = moe_tok(family)
    assert prune_cli(src, tmp_path / "refit", *FLAGS) == 0
    assert prune_cli(src, tmp_path / "plain", *FLAGS, "--reconstruct", "none") == 0
    plan = PrunePlan.load(tmp_path / "refit")
    info = plan.info["reconstruct"]
    assert info["error_refit"] < info["error_sliced"]
    assert info["calibration_loss"]["pruned_refit"] == pytest.approx(calib_loss(tmp_path / "refit"), abs=2e-5)
    assert info["calibration_loss"]["original"] == pytest.approx(calib_loss(src), abs=2e-5)
    refit, plain = hf_tensors(tmp_path / "refit"), hf_tensors(tmp_path / "plain")
    assert refit.keys() == plain.keys()
    changed = {k for k in refit if not torch.equal(refit[k], plain[k])}
    assert {k.split(".")[0] for k in changed} == {"q", "k", "v", "o", "router", "expert_gate", "expert_up",
                                                  "expert_down", "lm_head"}
    assert {k for k in changed if k.startswith("expert_down")} == {f"expert_down.{i}.{e}" for i in range(4)
                                                                   for e in range(2)}


def test_an_expert_routed_only_with_weight_zero_keeps_its_slices(moe_tok, tmp_path):
    """Two experts kept at top-2, one the router never weighs (tiny.DEAD_EXPERT): every token goes to it with
    routing weight 0, which carries no signal to refit on. It keeps its slices, as an unreached expert does (its
    moment was zero: the refit stopped as singular), and the other expert is refit."""
    from tiny import DEAD_EXPERT

    src = moe_tok("qwen3-moe")
    calib = ["--samples", "4", "--seq-len", "32", "--batch-size", "2"]
    assert main(["score", "--model", str(src), "--output", str(tmp_path / "s.pt"), *calib, "--no-progress"]) == 0
    scores = torch.load(tmp_path / "s.pt", weights_only=True)
    scores["experts"][:, DEAD_EXPERT] = scores["experts"].max() + 1  # kept, with the best of the others
    torch.save(scores, tmp_path / "s.pt")
    flags = ["--num-experts", "2", "--moe-ffn-hidden-size", "12", "--scores", str(tmp_path / "s.pt"), *calib]
    assert prune_cli(src, tmp_path / "refit", *flags) == 0
    assert prune_cli(src, tmp_path / "plain", *flags, "--reconstruct", "none") == 0
    plan = PrunePlan.load(tmp_path / "refit")
    refit, plain = hf_tensors(tmp_path / "refit"), hf_tensors(tmp_path / "plain")
    for i, lp in enumerate(plan.layers):
        dead, live = lp.experts.index(DEAD_EXPERT), 1 - lp.experts.index(DEAD_EXPERT)
        for role in ("expert_gate", "expert_up", "expert_down"):
            assert torch.equal(refit[f"{role}.{i}.{dead}"], plain[f"{role}.{i}.{dead}"])
            assert not torch.equal(refit[f"{role}.{i}.{live}"], plain[f"{role}.{i}.{live}"])


@pytest.mark.parametrize("family,layout", [("qwen3-moe", ["--tp", "2", "--ep", "2"]), ("mixtral", ["--pp", "2"])])
def test_moe_megatron_path_equals_the_hf_path(moe_tok, tmp_path, family, layout):
    """The same plan and calibration on the Megatron checkpoint (experts split by TP and EP, or layers by PP) gives,
    exported, the HF path's tensors: the refitted experts are written at their output positions on every rank."""
    src = moe_tok(family)
    assert prune_cli(src, tmp_path / "hf_out", *FLAGS) == 0
    assert main(["convert", "hf-to-megatron", "--input", str(src), "--output", str(tmp_path / "mg"), *layout,
                 "--no-progress"]) == 0
    assert main(["prune", "--input", str(tmp_path / "mg"), "--output", str(tmp_path / "mg_out"), "--plan",
                 str(tmp_path / "hf_out" / "prune_plan.json"), "--prune-type", "unbalance", *FLAGS[10:],
                 "--no-progress"]) == 0
    assert main(["convert", "megatron-to-hf", "--input", str(tmp_path / "mg_out"), "--output",
                 str(tmp_path / "back"), "--no-progress"]) == 0
    assert_same_tensors(hf_tensors(tmp_path / "hf_out"), hf_tensors(tmp_path / "back"))


@pytest.mark.parametrize("family", MOE)
@torch.no_grad()
def test_each_expert_is_refit_on_the_tokens_routed_to_it_weighted_by_its_routing_weight(family):
    """With the hidden size pruned (the pruned block's input is no longer the original's), by hand: the router is the
    ridge least squares of the original's kept logits on every token; expert k's gate/up, and then its down_proj,
    those of the original expert's kept outputs on the tokens the refit router sends to k, each token scaled by its
    routing weight; an expert no token reaches (DEAD) keeps its sliced weights."""
    from megatron.prune.refit.solve import Moment, solve_from_moments

    DEAD, delta = 1, 0.01
    teacher, calls, config = layer_calls(family, dead=DEAD)
    cfg = {**config.to_dict(), "architectures": config.architectures}
    s = shape_from_hf_config(cfg)
    hidden = tuple(range(40))  # channel 0 (the dead expert's) kept
    F = s.moe_ffn_hidden_size
    lp = LayerPlan(0, tuple(range(s.num_query_groups)), tuple(range(s.num_attention_heads)), (), tuple(range(4)),
                   tuple(tuple(c for c in range(F) if c != (5 + e) % F) for e in range(4)))
    plan = PrunePlan(s, s.replace(hidden_size=40, moe_ffn_hidden_size=F - 1, num_layers=1), hidden, (lp,))
    index, experts = layer_index(plan, lp), [layer_index(plan, lp, k) for k in range(4)]
    student = pruned_layer(teacher, student_config(config, plan), 0, index, s.head_dim, 1.0, experts)
    sliced = copy.deepcopy(student)
    seen: dict[str, list[torch.Tensor]] = {"t": [], "s": []}
    hooks = [teacher.mlp.register_forward_pre_hook(lambda m, a: seen["t"].append(a[0])),
             student.mlp.register_forward_pre_hook(lambda m, a: seen["s"].append(a[0]))]
    keep = torch.as_tensor(hidden)
    run = run_teacher(teacher, calls, index, s.head_dim)
    hooks.pop(0).remove()  # the original block's inputs, as the teacher's run saw them
    _, report = refit_layer(student, teacher, [Call(c.hidden[..., keep], c.kwargs) for c in calls], run, index,
                            s.head_dim, ("gate_up", "down"), delta, experts=experts)
    hooks.pop().remove()
    Xt = torch.cat([x.reshape(-1, s.hidden_size) for x in seen["t"]]).double()
    Xs = torch.cat([x.reshape(-1, 40) for x in seen["s"]]).double()

    def ridge(x: torch.Tensor, y: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        H, C = Moment(), Moment()
        H.add(x)
        C.add(y, x)
        return solve_from_moments(C.mean(), H.mean(), prior.double(), delta)

    t_mlp, s_mlp, o_mlp = teacher.mlp, student.mlp, sliced.mlp
    router = ridge(Xs, Xt @ t_mlp.gate.weight.double().T, o_mlp.gate.weight)
    live = [e for e in range(4) if e != DEAD]  # DEAD's row holds -1e5: float32 products round it by ~1e-6 of that
    torch.testing.assert_close(s_mlp.gate.weight.double()[live], router[live], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s_mlp.gate.weight.double()[DEAD], router[DEAD], rtol=1e-4, atol=0.2)
    _, weights, chosen = s_mlp.gate(Xs.float())
    assert not (chosen == DEAD).any()
    for name in ("gate_up_proj", "down_proj"):
        assert torch.equal(getattr(s_mlp.experts, name)[DEAD], getattr(o_mlp.experts, name)[DEAD])
    act = t_mlp.experts.act_fn
    for k in (0, 2, 3):
        token, slot = torch.where(chosen == k)
        w = weights[token, slot].double()[:, None]
        x_s, x_t = Xs[token], Xt[token]
        rows = torch.as_tensor([*lp.expert_ffn[k], *(F + c for c in lp.expert_ffn[k])])
        t_gu, t_down = t_mlp.experts.gate_up_proj[k].double(), t_mlp.experts.down_proj[k].double()
        gu = ridge(w * x_s, w * (x_t @ t_gu[rows].T), o_mlp.experts.gate_up_proj[k])
        torch.testing.assert_close(s_mlp.experts.gate_up_proj[k].double(), gu, rtol=1e-4, atol=1e-5)
        g_s, u_s = (x_s @ s_mlp.experts.gate_up_proj[k].double().T).chunk(2, -1)
        g_t, u_t = (x_t @ t_gu.T).chunk(2, -1)
        down = ridge(w * act(g_s) * u_s, w * ((act(g_t) * u_t) @ t_down[keep].T), o_mlp.experts.down_proj[k])
        torch.testing.assert_close(s_mlp.experts.down_proj[k].double(), down, rtol=1e-4, atol=1e-5)
        assert not torch.equal(s_mlp.experts.down_proj[k], o_mlp.experts.down_proj[k])
    assert report.groups["down"].refit < report.groups["down"].sliced


def test_balanced_moe_megatron_prune_with_refit_equals_the_hf_path(moe_tok, tmp_path):
    """`prune` of a TP=2 EP=2 MoE checkpoint (balanced, the default: experts per EP rank, channels per TP slice of
    each expert, chosen by activation, then refit): its export equals the HF model pruned with the same plan and
    refit on the same calibration, so refitted experts (whole tensors, mixing the TP slices) are re-split right."""
    src = moe_tok("qwen3-moe")
    assert main(["convert", "hf-to-megatron", "--input", str(src), "--output", str(tmp_path / "mg"), "--tp", "2",
                 "--ep", "2", "--no-progress"]) == 0
    assert prune_cli(tmp_path / "mg", tmp_path / "mg_out", *FLAGS) == 0
    plan = PrunePlan.load(tmp_path / "mg_out")
    assert plan.info["reconstruct"]["method"] == "least-squares" and plan.info["ep"] == 2
    assert prune_cli(src, tmp_path / "hf_out", "--plan", str(tmp_path / "mg_out" / "prune_plan.json"),
                     "--reconstruct", "least-squares", *FLAGS[10:]) == 0
    assert main(["convert", "megatron-to-hf", "--input", str(tmp_path / "mg_out"), "--output",
                 str(tmp_path / "back"), "--no-progress"]) == 0
    assert_same_tensors(hf_tensors(tmp_path / "hf_out"), hf_tensors(tmp_path / "back"))
