"""OBS selection (SlimGPT's criterion) against activation importance, both followed by the least-squares refit, on the
embedded SmolLM2-135M, CPU (issue 17's optional ``--method obs``: built only if it beats activation).

One calibration pass over the original model gives the activation scores (``prune --method activation``) and, per
layer, the second moments ``H`` of the inputs of ``o_proj`` and ``down_proj``. OBS ranks each layer's units by greedy
elimination: the unit whose removal, with the optimal compensation of the other columns (``W_K -= W_P [H⁻¹]_PP⁻¹
[H⁻¹]_PK``), costs the least error ``tr(W_P [H⁻¹]_PP⁻¹ W_Pᵀ)`` goes first, the inverse moment is downdated, and so
on; a unit's score is when it went (later = more important). FFN channels go 32 at a time (SlimGPT's column blocks),
heads and whole query groups one block of columns at a time. Hidden channels and layers keep their activation
scores. Each scores file then goes through ``megatron-prune prune --scores`` (refit on, the CLI's calibration), and
both results are evaluated on the built-in held-out text and on bench/quality.py's other-domain text.

    .venv/bin/python bench/obs_selection.py                  # ffn and demo shapes, 64 x 256 calibration (~25 min)
    .venv/bin/python bench/obs_selection.py --shapes ffn --samples 16   # quicker

Writes bench/results/obs_selection.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import SHAPES, other_domain_text

from megatron.prune.cli import build_parser
from megatron.prune.core.select import Scores
from megatron.prune.core.shape import shape_from_hf_config
from megatron.prune.models import embedded_model_dir
from megatron.prune.perplexity import greedy, perplexity
from megatron.prune.refit.solve import DEFAULT_DAMPING, damp, gram
from megatron.prune.runtime import load_hf, tokenize
from megatron.prune.scoring import methods, stats
from megatron.prune.text import builtin_text

PROMPT = "The built-in function len() returns"


def obs_ranking(W: torch.Tensor, H: torch.Tensor, width: int, per_round: int = 1,
                delta: float = DEFAULT_DAMPING) -> torch.Tensor:
    """Greedy OBS elimination order of the units of ``width`` consecutive input columns of ``W [out, n]``, given the
    input moment ``H [n, n]``: the ``per_round`` units of least cost ``tr(W_u [H⁻¹]_uu⁻¹ W_uᵀ)`` leave per round, the
    weights left are compensated and the inverse moment downdated. Returns one score per unit, its round of
    elimination (higher = more important)."""
    Hinv = torch.linalg.inv(damp(H.double(), delta))
    W = W.double().clone()
    units = H.shape[0] // width
    cols = torch.arange(H.shape[0]).reshape(units, width)
    alive = torch.ones(units, dtype=torch.bool)
    score = torch.zeros(units)
    step = 0
    while alive.any():
        live = alive.nonzero()[:, 0]
        c = cols[live]  # [u, w]
        W_u = W[:, c].permute(1, 2, 0)  # [u, w, out]
        cost = (W_u * torch.linalg.solve(Hinv[c[:, :, None], c[:, None, :]], W_u)).sum((1, 2))
        gone = live[torch.argsort(cost, stable=True)[:per_round]]
        score[gone] = float(step)
        step += 1
        alive[gone] = False
        if not alive.any():
            break
        P, R = cols[gone].reshape(-1), cols[alive].reshape(-1)
        inv_PP = torch.linalg.inv(Hinv[P][:, P])
        H_PR = Hinv[P][:, R]
        W[:, R] -= W[:, P] @ inv_PP @ H_PR
        Hinv[R[:, None], R[None, :]] -= H_PR.T @ inv_PP @ H_PR
    return score


@torch.no_grad()
def activation_and_obs(model, windows: torch.Tensor) -> tuple[Scores, Scores]:
    """Activation scores and OBS scores (hidden and layers from activation) from one pass over ``windows``."""
    shape = shape_from_hf_config(model.config.to_dict())
    moments: dict[tuple[str, int], torch.Tensor] = {}

    def accumulate(key: tuple[str, int]):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            moments[key] = moments[key] + gram(x).double() if key in moments else gram(x).double()
        return hook

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(accumulate(("o", i))))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(accumulate(("down", i))))
    try:
        act = stats.collect_scores(model, shape, windows, methods.DEFAULT_BATCH_SIZE, progress=False)
    finally:
        for h in handles:
            h.remove()
    tokens, hn = windows.numel(), shape.head_dim
    heads, groups, ffn = [], [], []
    for i, layer in enumerate(model.model.layers):
        H_o, H_d = moments.pop(("o", i)) / tokens, moments.pop(("down", i)) / tokens
        W_o, W_d = layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight
        heads.append(obs_ranking(W_o, H_o, hn))
        groups.append(obs_ranking(W_o, H_o, hn * shape.heads_per_group))
        ffn.append(obs_ranking(W_d, H_d, 1, per_round=32))  # SlimGPT's column blocks
    obs = dataclasses.replace(act, heads=torch.stack(heads), groups=torch.stack(groups), ffn=torch.stack(ffn),
                              method="obs")
    return act, obs


def flags(shape_name: str) -> list[str]:
    """The CLI flags of one of bench/quality.py's shapes."""
    req = SHAPES[shape_name][1]
    return [x for f in dataclasses.fields(req) if getattr(req, f.name) is not None
            for x in (f"--{f.name.replace('_', '-')}", str(getattr(req, f.name)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["ffn", "demo"])
    ap.add_argument("--samples", type=int, default=methods.DEFAULT_SAMPLES)
    ap.add_argument("--seq-len", type=int, default=methods.DEFAULT_SEQ_LEN)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "obs_selection.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    folder = embedded_model_dir()
    model, tok = load_hf(folder)
    texts = {"held-out": tokenize(tok, builtin_text("eval"), args.eval_tokens),
             "other": tokenize(tok, other_domain_text(), args.eval_tokens)}
    windows = methods.calibration_windows(tokenize(tok, builtin_text("calib"), None), args.samples, args.seq_len)
    t0 = time.time()
    scores = dict(zip(("activation", "obs"), activation_and_obs(model, windows)))
    print(f"activation + OBS scores in {time.time() - t0:.0f}s", flush=True)
    del model
    results: dict = {"model": "SmolLM2-135M-Instruct (embedded)", "calib": {"samples": args.samples,
                     "seq_len": args.seq_len}, "eval_tokens": args.eval_tokens, "shapes": {}}
    parser = build_parser(["prune"])
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes:
            row = results["shapes"][name] = {"description": SHAPES[name][0]}
            for method, sc in scores.items():
                path, out = Path(tmp) / f"{method}.pt", Path(tmp) / f"{name}-{method}"
                sc.save(path)
                p = parser.parse_args(["prune", "--input", str(folder), "--output", str(out), "--scores", str(path),
                                       "--samples", str(args.samples), "--seq-len", str(args.seq_len),
                                       "--no-progress", *flags(name)])
                p._run(p)
                m, t = load_hf(out)
                row[method] = {k: perplexity(m, ids, 512, progress=False).perplexity for k, ids in texts.items()}
                row[method]["continuation"] = " ".join(greedy(m, t, PROMPT).split())
                print(f"{name} {method}: {row[method]}", flush=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
