"""The lm-evaluation-harness bridge (eval --tasks), offline on a local task."""

from __future__ import annotations

import json

import pytest
import torch

from megatron.prune.cli import main


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
        rows.append({"question": q, "choices": cs, "answer": int(torch.tensor(lp).argmax()),
                     "worst": int(torch.tensor(lp).argmin())})
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
