"""The score verb, prune --method activation (--scores, --calib, --drop-layers auto), eval --tasks (lm-eval,
offline with a local task), and on the real model: activation selection beats random by a wide margin."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from megatron.prune.cli import main
from megatron.prune.formats.hf import HFCheckpoint
from megatron.prune.scoring.methods import load_scores
from megatron.prune.formats.mcore.ops import hf_to_megatron
from megatron.prune.core.plan import PrunePlan
from megatron.prune.core.shape import ModelShape
from megatron.prune.errors import PruneError
from tiny import make_tiny_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory, real_model):
    """A tiny random LLaMA with the real model's tokenizer (vocab 49152); layer 2 is a no-op."""
    folder = tmp_path_factory.mktemp("tok") / "model"
    model = make_tiny_model("llama-gqa", vocab_size=49152)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (real_model / name).is_file():
            shutil.copy(real_model / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from megatron.prune.text import builtin_text

    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    text = builtin_text("calib")
    path.write_text("\n".join(json.dumps({"text": text[i : i + 4000]}) for i in range(0, 40000, 4000)))
    return path


SMALL = ["--samples", "4", "--seq-len", "32", "--no-progress"]


def test_score_then_prune_with_scores_and_auto_layers(tok_model, calib_file, tmp_path, capsys):
    scores = tmp_path / "scores.pt"
    assert main(["score", "--model", str(tok_model), "--output", str(scores), "--calib", str(calib_file)] + SMALL) == 0
    out = capsys.readouterr().out
    assert "scored 128 tokens" in out and "first dropped): layers 2" in out
    meta = torch.load(scores, weights_only=True)["meta"]
    assert meta["tokens"] == 128 and meta["aggregation"] == "rms"

    pruned = tmp_path / "pruned"
    assert main(["prune", "--input", str(tok_model), "--output", str(pruned), "--method", "activation",
                 "--scores", str(scores), "--drop-layers", "auto", "--num-layers", "3", "--hidden-size", "40",
                 "--no-progress"]) == 0
    plan = PrunePlan.load(pruned)
    assert [lp.source_layer for lp in plan.layers] == [0, 1, 3]
    assert plan.info["method"] == "activation" and plan.info["layer_rule"] == "block-influence"
    assert plan.norm_scale == pytest.approx(math.sqrt(48 / 40)) and plan.info["norm_rescale"] == "sqrt"
    src, dst = load_file(tok_model / "model.safetensors"), load_file(pruned / "model.safetensors")
    kept = torch.tensor(plan.hidden)
    torch.testing.assert_close(dst["model.layers.2.input_layernorm.weight"],
                               src["model.layers.3.input_layernorm.weight"][kept] * plan.norm_scale)
    # kept hidden channels are the top-40 of the saved scores
    hidden = load_scores(scores, ModelShape.from_dict(meta["shape"])).hidden
    assert set(plan.hidden) == set(torch.argsort(-hidden, stable=True)[:40].tolist())

    # scoring on the fly with the same calibration settings gives the same plan
    again = tmp_path / "again"
    assert main(["prune", "--input", str(tok_model), "--output", str(again), "--method", "activation",
                 "--calib", str(calib_file), "--drop-layers", "auto", "--num-layers", "3", "--hidden-size", "40"]
                + SMALL) == 0
    assert PrunePlan.load(again) == plan


def test_norm_rescale_off(tok_model, tmp_path):
    out = tmp_path / "p"
    assert main(["prune", "--input", str(tok_model), "--output", str(out), "--method", "magnitude",
                 "--hidden-size", "40", "--norm-rescale", "none", "--no-progress"]) == 0
    assert PrunePlan.load(out).norm_scale == 1.0


def test_gqa_drop_groups_flag(tok_model, tmp_path):
    out = tmp_path / "p"
    assert main(["prune", "--input", str(tok_model), "--output", str(out), "--method", "magnitude",
                 "--num-attention-heads", "4", "--gqa", "drop-groups", "--no-progress"]) == 0
    t = PrunePlan.load(out).target
    assert (t.num_attention_heads, t.num_query_groups) == (4, 2)


@pytest.mark.parametrize("argv, message", [
    (["prune", "--method", "activation", "--drop-layers", "auto"], "needs --num-layers"),
    (["prune", "--method", "random", "--drop-layers", "auto", "--num-layers", "3"], "use --method activation"),
    (["score", "--samples", "100000"], "fewer than --samples 100000"),
])
def test_bad_input_is_refused_before_writing(tok_model, tmp_path, capsys, argv, message):
    out = tmp_path / ("out.pt" if argv[0] == "score" else "out")
    flag = "--model" if argv[0] == "score" else "--input"
    assert main(argv[:1] + [flag, str(tok_model), "--output", str(out), "--no-progress"] + argv[1:]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_scores_of_another_model_and_existing_output_are_refused(tok_model, tiny_hf, tmp_path, capsys):
    scores = tmp_path / "s.pt"
    assert main(["score", "--model", str(tok_model), "--output", str(scores)] + SMALL) == 0
    assert main(["score", "--model", str(tok_model), "--output", str(scores)] + SMALL) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["prune", "--input", str(tiny_hf("mistral")), "--output", str(tmp_path / "o"), "--method",
                 "activation", "--scores", str(scores), "--no-progress"]) == 2
    assert "another model" in capsys.readouterr().err
    assert main(["prune", "--input", str(tiny_hf("mistral")), "--output", str(tmp_path / "o"), "--method",
                 "activation", "--no-progress"]) == 2
    assert "no tokenizer" in capsys.readouterr().err


# ---- lm-evaluation-harness, offline with a local task --------------------------------------------------------


@torch.no_grad()
def choice_logprob(model, tok, context: str, choice: str) -> float:
    whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)[0]
    return float(sum(logp[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


def test_eval_tasks_bridge_offline(tok_model, tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(tok_model).eval()
    tok = AutoTokenizer.from_pretrained(tok_model)
    questions = ["The capital of France is", "A for loop repeats", "Python lists are", "The sky is"]
    choices = [["Paris", "blue", "a number"], ["code", "nothing", "Paris"], ["mutable", "green", "tall"],
               ["blue", "code", "twelve"]]
    # the "right" answer is the tiny model's own favourite, computed by hand: lm-eval must then score acc 1.0
    rows = []
    for q, cs in zip(questions, choices):
        lp = [choice_logprob(model, tok, q, c) for c in cs]
        rows.append({"question": q, "choices": cs, "answer": int(torch.tensor(lp).argmax()), "worst": int(torch.tensor(lp).argmin())})
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, key in (("tiny_best", "answer"), ("tiny_worst", "worst")):
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{{{question}}}}'\n"
            f"doc_to_choice: '{{{{choices}}}}'\ndoc_to_target: '{{{{{key}}}}}'\nmetric_list:\n  - metric: acc\n")
    assert main(["eval", "--model", str(tok_model), "--tasks", "tiny_best", "tiny_worst", "--include-path",
                 str(tasks), "--device", "cpu", "--json", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    results = json.loads(next(l for l in lines if l.startswith("{")))["tasks"]
    assert results["tiny_best"]["acc,none"] == 1.0
    assert results["tiny_worst"]["acc,none"] == 0.0
    assert main(["eval", "--model", str(tok_model), "--tasks", "no_such_task_xyz", "--include-path", str(tasks),
                 "--device", "cpu"]) == 2
    capsys.readouterr()
    data.unlink()  # a task whose data cannot be loaded (as a Hub task offline): one line, no traceback
    assert main(["eval", "--model", str(tok_model), "--tasks", "tiny_best", "--include-path", str(tasks),
                 "--device", "cpu", "--no-progress"]) == 2
    assert "--tasks tiny_best: could not load a task's data (" in capsys.readouterr().err


def test_eval_refuses_folders_without_an_hf_model(tok_model, tmp_path, capsys):
    """A config without weights, a folder that is neither format, and a Megatron checkpoint without a tokenizer in
    hf_meta/ (converted elsewhere) are each refused before transformers' own errors."""
    bare = tmp_path / "bare"
    bare.mkdir()
    assert main(["eval", "--model", str(bare)]) == 2
    assert f"{bare} is not an HF model folder (no config.json) nor a Megatron checkpoint" in capsys.readouterr().err
    shutil.copy(tok_model / "config.json", bare)
    assert main(["eval", "--model", str(bare)]) == 2
    assert f"{bare}: no weights (*.safetensors or pytorch_model*.bin) beside its config.json" in capsys.readouterr().err
    mg = tmp_path / "mg"
    hf_to_megatron(tok_model, mg, progress=False)
    for name in TOKENIZER_FILES:
        (mg / "hf_meta" / name).unlink(missing_ok=True)
    for argv in (["eval", "--model", str(mg)],
                 ["score", "--model", str(mg), "--output", str(tmp_path / "s.pt"), "--layer-by-layer", "always"]):
        assert main(argv) == 2
        assert f"{mg} has no tokenizer in hf_meta/ (a checkpoint converted elsewhere): export it with " \
               f"`megatron-prune convert megatron-to-hf --input {mg} --output {mg}-hf`" in capsys.readouterr().err
    assert main(["prune", "--input", str(mg), "--output", str(tmp_path / "p"), "--num-layers", "3",
                 "--no-progress"]) == 0
    assert "--method auto: random (the input has no tokenizer" in capsys.readouterr().out


def test_a_megatron_checkpoint_is_scored_and_evaluated_as_its_hf_model(tok_model, tmp_path, capsys):
    """score and eval on a Megatron checkpoint (TP=2 PP=2 torch, and torch_dist) build the HF model in memory: the
    scores and the perplexity equal those of the HF checkpoint bit for bit, and so do the scores and the perplexity of
    each input taken one decoder layer at a time (short last batches); prune --method auto on it scores
    activations and keeps the same layers and units as on the HF input; a layout error comes before scoring."""
    hf_to_megatron(tok_model, tmp_path / "mg", tp=2, pp=2, progress=False)
    hf_to_megatron(tok_model, tmp_path / "dist", tp=2, progress=False, ckpt_format="torch_dist")
    ppl, scores = {}, {}
    for name, folder in (("hf", tok_model), ("mg", tmp_path / "mg"), ("dist", tmp_path / "dist")):
        for mode in ("never", "always"):  # the whole model in memory, or one decoder layer at a time
            key = name if mode == "never" else f"{name}-layerwise"
            assert main(["score", "--model", str(folder), "--output", str(tmp_path / f"{key}.pt"),
                         "--layer-by-layer", mode, "--batch-size", "3"] + SMALL) == 0
            scores[key] = torch.load(tmp_path / f"{key}.pt", weights_only=True)
            assert scores[key].pop("meta")["layer_by_layer"] is (mode == "always")
        for mode in ("never", "always"):
            assert main(["eval", "--model", str(folder), "--max-tokens", "320", "--seq-len", "64", "--json",
                         "--batch-size", "2", "--no-progress", "--layer-by-layer", mode]) == 0
            out = capsys.readouterr().out
            ppl[f"{name}-{mode}"] = json.loads(next(l for l in out.splitlines() if l.startswith("{")))["perplexity"]
    assert len(set(ppl.values())) == 1 and len(ppl) == 6, ppl
    want = scores["hf"]
    assert sum(isinstance(v, torch.Tensor) for v in want.values()) == 5  # hidden, heads, groups, ffn, layers
    for name in ("mg", "dist", "hf-layerwise", "mg-layerwise", "dist-layerwise"):
        assert set(scores[name]) == set(want) and all(
            torch.equal(v, scores[name][k]) if isinstance(v, torch.Tensor) else v == scores[name][k]
            for k, v in want.items()), name
    assert main(["prune", "--input", str(tmp_path / "mg"), "--output", str(tmp_path / "p"), "--num-layers", "3",
                 "--no-progress"]) == 2  # refused before the (costly) scoring pass, not after it
    out, err = capsys.readouterr()
    assert "--method auto" not in out and "3 layers, not divisible by the checkpoint's pipeline-parallel size 2" in err
    plans = {}
    for name, folder, extra in (("hf", tok_model, []), ("mg", tmp_path / "dist", ["--prune-type", "unbalance"])):
        out = tmp_path / f"pruned-{name}"
        assert main(["prune", "--input", str(folder), "--output", str(out), "--num-layers", "3", "--hidden-size",
                     "40", "--num-attention-heads", "4", "--num-query-groups", "2", "--ffn-hidden-size", "32"]
                    + extra + SMALL) == 0
        assert "--method auto: activation" in capsys.readouterr().out
        plans[name] = {k: v for k, v in PrunePlan.load(out).to_dict().items() if k != "info"}
    assert [lp["source_layer"] for lp in plans["mg"]["layers"]] == [0, 1, 3]
    assert plans["mg"] == plans["hf"]


def test_layer_by_layer_holds_one_decoder_layer_at_a_time(tok_model, monkeypatch, capsys):
    """Scoring layer by layer materialises one decoder layer at a time (the embedding is freed before the first);
    --layer-by-layer auto takes that path only when the whole model would not fit in half the free memory, and
    says so."""
    from megatron.prune.scoring import layerwise
    from megatron.prune.scoring.methods import ScoringOptions, score_model

    seen: dict[str, object] = {"most_layers": 0, "calls": 0}
    skeleton, materialise = layerwise.skeleton, layerwise.materialise

    def keep(config, dtype):
        seen["model"] = skeleton(config, dtype)
        return seen["model"]

    def watch(module, prefix, src, device):
        materialise(module, prefix, src, device)
        body = seen["model"].model
        real = [i for i, layer in enumerate(body.layers) if any(p.device.type != "meta" for p in layer.parameters())]
        if real:
            assert body.embed_tokens.weight.device.type == "meta" and real == [int(prefix.split(".")[-1])], real
        seen["most_layers"], seen["calls"] = max(seen["most_layers"], len(real)), seen["calls"] + 1

    monkeypatch.setattr(layerwise, "skeleton", keep)
    monkeypatch.setattr(layerwise, "materialise", watch)
    need = HFCheckpoint.open(tok_model).shape.num_params() * 4
    for free, layered in ((need * 3, False), (need, True)):
        monkeypatch.setattr(layerwise, "free_bytes", lambda device, free=free: free)
        run = score_model(tok_model, ScoringOptions(samples=4, seq_len=32, progress=False))
        assert run.meta["layer_by_layer"] is layered
        out = capsys.readouterr().out
        assert ("scoring layer by layer: the whole model (" in out and "would take more than 50% of the" in out) \
            is layered
    assert seen["most_layers"] == 1 and seen["calls"] == 1 + 4  # the embedding, then each of the 4 layers
    with pytest.raises(PruneError, match="--layer-by-layer 'sometimes'; choose one of auto, always, never"):
        score_model(tok_model, ScoringOptions(samples=4, seq_len=32, progress=False, layer_by_layer="sometimes"))


def test_layer_by_layer_perplexity_of_a_tied_model(real_model, tmp_path, capsys):
    """Tied embeddings: the layer-by-layer head is the embedding, and the perplexity is the whole model's."""
    folder = tmp_path / "tied"
    make_tiny_model("llama-tied", vocab_size=49152).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (real_model / name).is_file():
            shutil.copy(real_model / name, folder / name)
    ppl = []
    for mode in ("never", "always"):
        assert main(["eval", "--model", str(folder), "--max-tokens", "256", "--seq-len", "64", "--no-progress",
                     "--layer-by-layer", mode]) == 0
        ppl.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert ppl[0] == ppl[1] and ppl[0].startswith("perplexity: "), ppl
    assert main(["eval", "--model", str(folder), "--tasks", "hellaswag", "--layer-by-layer", "always"]) == 2
    assert "--layer-by-layer always: lm-eval tasks need the whole model in memory" in capsys.readouterr().err


# ---- the real model ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_activation_beats_random_on_the_real_model(real_model, tmp_path):
    from megatron.prune.perplexity import perplexity
    from megatron.prune.runtime import load_hf, tokenize
    from megatron.prune.text import builtin_text

    shape = ["--hidden-size", "468", "--ffn-hidden-size", "1024", "--no-progress"]
    ppl = {}
    for method, extra in (("activation", ["--samples", "8", "--seq-len", "128"]), ("random", ["--seed", "1"])):
        out = tmp_path / method
        assert main(["prune", "--input", str(real_model), "--output", str(out), "--method", method] + shape + extra) == 0
        model, tok = load_hf(out)
        ids = tokenize(tok, builtin_text("eval"), 2048)
        ppl[method] = perplexity(model, ids, seq_len=512, progress=False).perplexity
        del model
        shutil.rmtree(out)
    assert ppl["activation"] <= 0.3 * ppl["random"], ppl


def test_method_auto_is_activation_where_it_can_score(tok_model, tiny_hf, tmp_path, capsys):
    assert main(["prune", "--input", str(tok_model), "--output", str(tmp_path / "a"), "--num-layers", "3"]
                + SMALL) == 0
    assert "--method auto: activation" in capsys.readouterr().out
    plan = PrunePlan.load(tmp_path / "a")
    assert plan.info["method"] == "activation" and [lp.source_layer for lp in plan.layers] == [0, 1, 3]
    assert main(["prune", "--input", str(tiny_hf("mistral")), "--output", str(tmp_path / "b"), "--num-layers", "3",
                 "--no-progress"]) == 0
    assert "falling back to random" in capsys.readouterr().out
    assert PrunePlan.load(tmp_path / "b").info["method"] == "random"
