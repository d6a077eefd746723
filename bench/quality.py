"""Quality benchmark: how good is a pruned model with 0 training tokens, by selection method?

On the embedded SmolLM2-135M, for three shapes (width only; depth only; width+depth to about half the
parameters) plus a GQA comparison, prune in memory with random (3 seeds, random layers too), magnitude and
activation/block-influence selection, and measure perplexity on the built-in held-out text. Also measures the
aggregation and RMSNorm-rescaling choices, and the time scoring takes vs one plain forward over the same tokens.

    .venv/bin/python bench/quality.py            # ~15-25 min on 2 CPU cores
    .venv/bin/python bench/quality.py --quick    # fewer tokens, for a smoke run

Writes bench/results/quality.json and assets/quality.png (if matplotlib is installed) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from megatron.prune.core import plan as plan_mod
from megatron.prune.scoring import methods
from megatron.prune.scoring import stats
from megatron.prune.perplexity import perplexity
from megatron.prune.runtime import load_hf, tokenize
from megatron.prune.core.roles import expected_roles
from megatron.prune.formats.hf import HFCheckpoint, hf_name
from megatron.prune.models import embedded_model_dir
from megatron.prune.core.plan import PrunePlan
from megatron.prune.core.select import Scores, make_plan
from megatron.prune.core.target import TargetRequest, resolve_target
from megatron.prune.scoring.methods import magnitude_scores, random_scores
from megatron.prune.core.shape import hf_config_for_shape
from megatron.prune.core.slicing import layer_index, model_index, slice_role
from megatron.prune.text import builtin_text

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # name -> (what it tests, TargetRequest); hidden sizes are multiples of the 9 (or 6) heads
    "width": ("hidden 576->468, FFN 1536->1024", TargetRequest(hidden_size=468, ffn_hidden_size=1024)),
    "depth": ("30 -> 24 layers", TargetRequest(num_layers=24)),
    "width+depth": ("hidden 432, FFN 1024, 22 layers (~half)",
                    TargetRequest(hidden_size=432, ffn_hidden_size=1024, num_layers=22)),
}
GQA_SHAPE = ("heads 9->6, hidden 576->504", dict(hidden_size=504, num_attention_heads=6))


def in_memory_prune(state: dict[str, torch.Tensor], config: dict, plan: PrunePlan):
    """The pruned HF model, built with the same slicing rules the writer uses, without touching disk."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sd = {}
    for role, new_layer in expected_roles(plan.target):
        src_layer = None if new_layer is None else plan.layers[new_layer].source_layer
        index = model_index(plan) if new_layer is None else layer_index(plan, plan.layers[new_layer])
        sd[hf_name(role, new_layer)] = slice_role(role, state[hf_name(role, src_layer)], index,
                                                  plan.source.head_dim, plan.norm_scale)
    cfg = AutoConfig.for_model(**{k: v for k, v in hf_config_for_shape(config, plan.target).items()
                                  if k not in ("architectures", "torch_dtype", "dtype")})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


def random_with_layers(shape, seed: int) -> Scores:
    """Random everything, layers included (the CLI's random keeps the seed's spread-middle layer rule)."""
    s = random_scores(shape, seed)
    return dataclasses.replace(s, layers=torch.rand(shape.num_layers, generator=torch.Generator().manual_seed(seed + 7)))


@torch.no_grad()
def time_forward(model, windows: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(wall, CPU) seconds of one plain forward of the full model over ``windows``."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, windows.shape[0], batch_size):
        model(input_ids=windows[i : i + batch_size], use_cache=False)
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few tokens: a smoke run, numbers not meaningful")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=methods.DEFAULT_SEQ_LEN)
    ap.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    ap.add_argument("--chart", type=Path, default=ROOT / "assets" / "quality.png")
    args = ap.parse_args(argv)
    if args.quick:
        args.eval_tokens, args.samples, args.seq_len = 1024, 4, 128
    torch.manual_seed(0)
    folder = embedded_model_dir()
    ckpt = HFCheckpoint.open(folder)
    shape = ckpt.shape
    model, tok = load_hf(folder)
    state = {k: v for k, v in model.state_dict().items()}
    if "lm_head.weight" not in state or shape.tied_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    eval_ids = tokenize(tok, builtin_text("eval"), args.eval_tokens)
    calib = methods.calibration_windows(tokenize(tok, builtin_text("calib"), None), args.samples, args.seq_len)

    def ppl(m) -> float:
        return perplexity(m, eval_ids, seq_len=512 if not args.quick else 256, batch_size=4, progress=False).perplexity

    results: dict = {"model": "SmolLM2-135M-Instruct (embedded)", "eval_tokens": int(eval_ids.numel()),
                     "calib": {"samples": args.samples, "seq_len": args.seq_len, "tokens": int(calib.numel())},
                     "source_params": shape.num_params(), "shapes": {}, "ablations": {}}
    t0 = time.time()
    results["original_ppl"] = ppl(model)
    print(f"original perplexity {results['original_ppl']:.2f} ({time.time() - t0:.0f}s)", flush=True)

    # -- scoring, and its cost vs a plain forward over the same tokens (min of 2, interleaved: the machine is shared)
    bs = methods.DEFAULT_BATCH_SIZE
    fwd, score_t, scores = [], [], {}
    for agg in ("mean-l2", "rms", "mean"):  # timing: interleaved, best of each (the machine may be shared)
        if agg != "mean":
            fwd.append(time_forward(model, calib, bs))
        t, c = time.perf_counter(), time.process_time()
        scores[agg] = stats.collect_scores(model, shape, calib, bs, agg, progress=False)
        score_t.append((time.perf_counter() - t, time.process_time() - c))
    wall = min(s for s, _ in score_t) / min(f for f, _ in fwd)
    cpu = min(c for _, c in score_t) / min(c for _, c in fwd)
    results["timing"] = {"plain_forward_s": min(f for f, _ in fwd), "scoring_s": min(s for s, _ in score_t),
                         "ratio": wall, "ratio_cpu_time": cpu, "tokens": int(calib.numel()),
                         "threads": torch.get_num_threads(), "all_forward_wall_cpu_s": fwd,
                         "all_scoring_wall_cpu_s": score_t}
    print(f"scoring {results['timing']['scoring_s']:.1f}s vs plain forward {results['timing']['plain_forward_s']:.1f}s "
          f"over {calib.numel()} tokens (wall ratio {wall:.2f}, CPU-time ratio {cpu:.2f})", flush=True)
    mag = magnitude_scores(ckpt)

    def run(target_req: TargetRequest, sc: Scores, rescale: str = "sqrt", groups: int | None = None) -> dict:
        req = dataclasses.replace(target_req, num_query_groups=groups) if groups else target_req
        target, drop = resolve_target(shape, req)
        plan = plan_mod.norm_rescale(make_plan(shape, target, sc, drop), rescale)
        m = in_memory_prune(state, ckpt.config, plan)
        value = ppl(m)
        kept = [lp.source_layer for lp in plan.layers]
        return {"ppl": value, "params": target.num_params(),
                "dropped_layers": [i for i in range(shape.num_layers) if i not in kept]}

    for name, (desc, req) in SHAPES.items():
        row: dict = {"description": desc}
        rnd = [run(req, random_with_layers(shape, seed)) for seed in (0, 1, 2)]
        row["random_seeds"] = [r["ppl"] for r in rnd]
        row["random"] = statistics.fmean(row["random_seeds"])
        row["random_geomean"] = math.exp(statistics.fmean(math.log(p) for p in row["random_seeds"]))
        if req.num_layers:
            row["random_spread_middle"] = run(req, random_scores(shape, 0))["ppl"]  # the CLI's random: seed rule
        row["magnitude"] = run(req, mag)["ppl"]
        act = run(req, scores[stats.DEFAULT_AGGREGATION])  # what `prune --method activation` does
        row["activation"], row["params"], row["activation_dropped_layers"] = act["ppl"], act["params"], act["dropped_layers"]
        row["ratio_vs_random"] = row["activation"] / row["random"]
        row["ratio_vs_best_random_seed"] = row["activation"] / min(row["random_seeds"])
        results["shapes"][name] = row
        print(f"{name:12s} {json.dumps({k: v for k, v in row.items() if k != 'description'})}", flush=True)

    # -- measured choices: aggregation, norm rescaling, GQA
    ab = results["ablations"]
    for name in ("width", "width+depth"):
        req = SHAPES[name][1]
        ab[f"{name}: aggregation"] = {agg: run(req, scores[agg])["ppl"] for agg in ("mean-l2", "mean", "rms")}
        ab[f"{name}: norm rescale"] = {"sqrt": results["shapes"][name]["activation"],
                                       "none": run(req, scores[stats.DEFAULT_AGGREGATION], "none")["ppl"]}
        if name == "width":
            ab[f"{name}: norm rescale (random seed 0)"] = {
                "sqrt": results["shapes"][name]["random_seeds"][0],
                "none": run(req, random_with_layers(shape, 0), "none")["ppl"]}
        print(f"{name}: {ab[f'{name}: aggregation']} {ab[f'{name}: norm rescale']}", flush=True)
    greq = TargetRequest(**GQA_SHAPE[1])
    ab["gqa"] = {"description": GQA_SHAPE[0],
                 "trim-heads (3 groups x 2 heads)": run(greq, scores[stats.DEFAULT_AGGREGATION], groups=3)["ppl"],
                 "drop-groups (2 groups x 3 heads)": run(greq, scores[stats.DEFAULT_AGGREGATION], groups=2)["ppl"],
                 "random trim-heads (seed 0)": run(greq, random_with_layers(shape, 0), groups=3)["ppl"]}
    print(f"gqa: {ab['gqa']}", flush=True)
    results["targets"] = {
        "activation <= 0.1 x random (mean of 3 seeds), every shape":
            all(r["ratio_vs_random"] <= 0.1 for r in results["shapes"].values()),
        "scoring <= 1.5 x plain forward": results["timing"]["ratio"] <= 1.5,
    }
    results["seconds"] = round(time.time() - t0, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    print(table(results))
    chart(results, args.chart)
    return 0


def table(r: dict) -> str:
    lines = [f"perplexity, 0 training tokens, {r['eval_tokens']} held-out tokens (original {r['original_ppl']:.2f})",
             "| shape | params | random (3 seeds: mean; range) | magnitude | activation | act / random |",
             "|---|---|---|---|---|---|"]
    for name, row in r["shapes"].items():
        seeds = row["random_seeds"]
        extra = f"; seed rule {row['random_spread_middle']:,.0f}" if "random_spread_middle" in row else ""
        lines.append(f"| {name}: {row['description']} | {row['params'] / 1e6:.0f}M | {row['random']:,.0f} "
                     f"({min(seeds):,.0f}-{max(seeds):,.0f}{extra}) | {row['magnitude']:,.0f} | "
                     f"{row['activation']:,.1f} | {row['ratio_vs_random']:.4f} |")
    t = r["timing"]
    lines.append(f"scoring {t['scoring_s']:.1f}s vs plain forward {t['plain_forward_s']:.1f}s over {t['tokens']} tokens "
                 f"= {t['ratio']:.2f}x wall ({t['ratio_cpu_time']:.2f}x CPU time)")
    for k, v in r["ablations"].items():
        lines.append(f"{k}: " + ", ".join(f"{a} {b:,.1f}" if isinstance(b, float) else f"{b}" for a, b in v.items()))
    lines += [f"target {k}: {'met' if v else 'NOT met'}" for k, v in r["targets"].items()]
    return "\n".join(lines)


def chart(r: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return
    names = list(r["shapes"])
    methods = [("random", "random (mean of 3 seeds)"), ("magnitude", "magnitude"), ("activation", "activation")]
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.27
    for j, (key, label) in enumerate(methods):
        vals = [r["shapes"][n][key] for n in names]
        bars = ax.bar([i + (j - 1) * w for i in range(len(names))], vals, w, label=label)
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in vals], fontsize=7)
    ax.axhline(r["original_ppl"], color="k", ls="--", lw=0.8, label=f"original {r['original_ppl']:.1f}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), [f"{n}\n{r['shapes'][n]['description']}" for n in names], fontsize=8)
    ax.set_ylabel("perplexity, 0 training tokens (log)")
    ax.set_title("SmolLM2-135M pruned without training: selection method matters")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
