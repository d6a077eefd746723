"""Quality benchmark: how good is a pruned model with 0 training tokens, by selection method, with and without the
least-squares refit of the kept weights?

On the embedded SmolLM2-135M, for five shapes (width only; depth only; width+depth to about half the parameters;
the demo's shape; FFN only) plus a GQA comparison, prune in memory with random (3 seeds, random layers too),
magnitude and activation/block-influence selection, then refit the activation-selected model
(``prune --reconstruct least-squares``, the real code path), and measure perplexity on the built-in held-out text
and on a text of another domain (Python's license and IDLE's changelog, which ship with Python). Also measures the
aggregation, RMSNorm-rescaling and depth-refit choices, and the time scoring and the refit take vs one plain forward
over the same calibration tokens.

    .venv/bin/python bench/quality.py            # ~1.5-2 h on 2 CPU cores
    .venv/bin/python bench/quality.py --quick    # fewer tokens, for a smoke run

Writes bench/results/quality.json and assets/quality.png (if matplotlib is installed) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from megatron.prune.core import plan as plan_mod
from megatron.prune.core.plan import PrunePlan
from megatron.prune.core.roles import expected_roles
from megatron.prune.core.select import Scores, make_plan
from megatron.prune.core.shape import hf_config_for_shape
from megatron.prune.core.slicing import layer_index, model_index, slice_role
from megatron.prune.core.target import TargetRequest, resolve_target
from megatron.prune.formats.hf import HFCheckpoint, hf_name
from megatron.prune.models import embedded_model_dir
from megatron.prune.perplexity import perplexity
from megatron.prune.refit.sequential import RefitOptions, refit_model
from megatron.prune.refit.store import RefitStore
from megatron.prune.runtime import load_hf, tokenize
from megatron.prune.scoring import methods, stats
from megatron.prune.scoring.methods import magnitude_scores, random_scores
from megatron.prune.text import builtin_text

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # name -> (what it tests, TargetRequest); hidden sizes are multiples of the 9 (or 6) heads
    "width": ("hidden 576->468, FFN 1536->1024", TargetRequest(hidden_size=468, ffn_hidden_size=1024)),
    "depth": ("30 -> 24 layers", TargetRequest(num_layers=24)),
    "width+depth": ("hidden 432, FFN 1024, 22 layers (~half)",
                    TargetRequest(hidden_size=432, ffn_hidden_size=1024, num_layers=22)),
    "demo": ("24 layers, hidden 480, 6 heads / 2 groups, FFN 1024 (make demo)",
             TargetRequest(num_layers=24, hidden_size=480, num_attention_heads=6, num_query_groups=2,
                           ffn_hidden_size=1024)),
    "ffn": ("FFN only: 1536->1024 (-20% parameters)", TargetRequest(ffn_hidden_size=1024)),
}


def other_domain_text() -> str:
    """English prose of another domain than the calibration text (license terms and a changelog), shipped with
    Python: a check that the refit does not just fit the calibration text's domain."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((stdlib / name).read_text(encoding="utf-8") for name in ("LICENSE.txt", "idlelib/NEWS.txt"))


GQA_SHAPE = ("heads 9->6, hidden 576->504", {"hidden_size": 504, "num_attention_heads": 6})


def in_memory_prune(state: dict[str, torch.Tensor], config: dict, plan: PrunePlan, overrides=None):
    """The pruned HF model, built with the same slicing rules (and refitted tensors) the writer uses, in memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sd = {}
    for role, new_layer in expected_roles(plan.target):
        if overrides is not None and overrides.has(role, new_layer):
            sd[hf_name(role, new_layer)] = overrides.get(role, new_layer)
            continue
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


DEFAULT_REFIT = RefitOptions()


class Without:
    """A refit store with one model-level role hidden (what the model is without that part of the refit)."""

    def __init__(self, store: RefitStore, role: str) -> None:
        self.store, self.role = store, role

    def has(self, role: str, layer: int | None = None) -> bool:
        return not (role == self.role and layer is None) and self.store.has(role, layer)

    def get(self, role: str, layer: int | None = None) -> torch.Tensor:
        return self.store.get(role, layer)


def random_with_layers(shape, seed: int) -> Scores:
    """Random everything, layers included (the CLI's random keeps the seed's spread-middle layer rule)."""
    s = random_scores(shape, seed)
    return dataclasses.replace(s, layers=torch.rand(shape.num_layers,
                                                    generator=torch.Generator().manual_seed(seed + 7)))


@torch.no_grad()
def time_forward(model, windows: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(wall, CPU) seconds of one plain forward of the full model over ``windows``."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, windows.shape[0], batch_size):
        model(input_ids=windows[i : i + batch_size], use_cache=False)
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few tokens, two shapes: a smoke run, numbers not meaningful")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--samples", type=int, default=methods.DEFAULT_SAMPLES)
    ap.add_argument("--seq-len", type=int, default=methods.DEFAULT_SEQ_LEN)
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--no-ablations", action="store_true", help="shapes only")
    ap.add_argument("--aggregation-only", action="store_true",
                    help="only the aggregation choice (selection only, held-out and other domain) on --shapes")
    ap.add_argument("--baselines", action="store_true",
                    help="also random (3 seeds) and magnitude selection per shape (measured at 4k tokens before: "
                         "bench/results/quality_selection.json)")
    ap.add_argument("--all-ablations", action="store_true",
                    help="also aggregation on the width shape, RMSNorm rescaling and the GQA choice")
    ap.add_argument("--damping-ablation", action="store_true",
                    help="also refit the demo shape at damping 0.001 and 0.1")
    ap.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    ap.add_argument("--chart", type=Path, default=ROOT / "assets" / "quality.png")
    args = ap.parse_args(argv)
    if args.quick:
        args.eval_tokens, args.samples, args.seq_len, args.shapes = 1024, 4, 128, ["width", "depth"]
    torch.manual_seed(0)
    folder = embedded_model_dir()
    ckpt = HFCheckpoint.open(folder)
    shape = ckpt.shape
    model, tok = load_hf(folder)
    state = {k: v for k, v in model.state_dict().items()}
    if "lm_head.weight" not in state or shape.tied_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    texts = {"held-out": tokenize(tok, builtin_text("eval"), args.eval_tokens),
             "other": tokenize(tok, other_domain_text(), args.eval_tokens)}
    calib = methods.calibration_windows(tokenize(tok, builtin_text("calib"), None), args.samples, args.seq_len)
    window = 512 if not args.quick else 256

    def ppl(m, text: str = "held-out") -> float:
        return perplexity(m, texts[text], seq_len=window, batch_size=4, progress=False).perplexity

    results: dict = {"model": "SmolLM2-135M-Instruct (embedded)",
                     "eval_tokens": {k: int(v.numel()) for k, v in texts.items()},
                     "calib": {"samples": args.samples, "seq_len": args.seq_len, "tokens": int(calib.numel())},
                     "source_params": shape.num_params(), "shapes": {}, "ablations": {}}
    t0 = time.time()
    results["original_ppl"] = {k: ppl(model, k) for k in texts}
    print(f"original perplexity {results['original_ppl']} ({time.time() - t0:.0f}s)", flush=True)

    # -- scoring, and its cost vs a plain forward over the same tokens (min of 2, interleaved: the machine is shared)
    bs = methods.DEFAULT_BATCH_SIZE
    fwd, score_t, scores = [], [], {}
    aggregations = [stats.DEFAULT_AGGREGATION] if args.no_ablations else ["mean-l2", "rms", "mean"]
    for agg in aggregations:  # timing: interleaved, best of each (the machine may be shared)
        if agg != "mean":  # a plain forward before every scoring pass but the third
            fwd.append(time_forward(model, calib, bs))
        t, c = time.perf_counter(), time.process_time()
        scores[agg] = stats.collect_scores(model, shape, calib, bs, agg, progress=False)
        score_t.append((time.perf_counter() - t, time.process_time() - c))
    forward_s = min(f for f, _ in fwd)
    scoring_s = min(s for s, _ in score_t)
    results["timing"] = {"plain_forward_s": forward_s, "scoring_s": scoring_s, "ratio": scoring_s / forward_s,
                         "ratio_cpu_time": min(c for _, c in score_t) / min(c for _, c in fwd),
                         "tokens": int(calib.numel()), "threads": torch.get_num_threads(),
                         "all_forward_wall_cpu_s": fwd, "all_scoring_wall_cpu_s": score_t, "refit_s": {}}
    print(f"scoring {scoring_s:.1f}s vs plain forward {forward_s:.1f}s over {calib.numel()} tokens "
          f"(wall ratio {scoring_s / forward_s:.2f})", flush=True)
    mag = magnitude_scores(ckpt)

    def plan_for(target_req: TargetRequest, sc: Scores, rescale: str = "sqrt", groups: int | None = None):
        req = dataclasses.replace(target_req, num_query_groups=groups) if groups else target_req
        target, drop = resolve_target(shape, req)
        return plan_mod.norm_rescale(make_plan(shape, target, sc, drop), rescale)

    def run(target_req: TargetRequest, sc: Scores, rescale: str = "sqrt", groups: int | None = None,
            other: bool = False) -> dict:
        plan = plan_for(target_req, sc, rescale, groups)
        m = in_memory_prune(state, ckpt.config, plan)
        kept = [lp.source_layer for lp in plan.layers]
        out = {"ppl": ppl(m), "params": plan.target.num_params(),
               "dropped_layers": [i for i in range(shape.num_layers) if i not in kept]}
        if other:
            out["ppl_other"] = ppl(m, "other")
        return out

    def refit(target_req: TargetRequest, sc: Scores, options: RefitOptions = DEFAULT_REFIT,
              with_head_ablation: bool = False) -> dict:
        plan = plan_for(target_req, sc)
        with tempfile.TemporaryDirectory(prefix="bench-refit-") as scratch:
            store = RefitStore(Path(scratch))
            t, c = time.perf_counter(), time.process_time()
            summary = refit_model(ckpt, AutoConfig.from_pretrained(folder), plan, calib, bs, torch.float32, "cpu",
                                  store, options, progress=False)
            seconds, cpu = time.perf_counter() - t, time.process_time() - c
            m = in_memory_prune(state, ckpt.config, plan, store)
            out = {"ppl": ppl(m), "ppl_other": ppl(m, "other"), "refit_s": seconds, "refit_cpu_s": cpu,
                   "error_sliced_refit": summary.mean_error(), "head": [summary.head_role, summary.head]}
            if with_head_ablation and store.has("final_norm"):  # the tied head's gain refit left out
                out["ppl_without_head_gain"] = ppl(in_memory_prune(state, ckpt.config, plan,
                                                                   Without(store, "final_norm")))
        return out

    act_scores = scores[stats.DEFAULT_AGGREGATION]
    for name in [] if args.aggregation_only else args.shapes:
        desc, req = SHAPES[name]
        row: dict = {"description": desc}
        if args.baselines:
            rnd = [run(req, random_with_layers(shape, seed)) for seed in (0, 1, 2)]
            row["random_seeds"] = [r["ppl"] for r in rnd]
            row["random"] = statistics.fmean(row["random_seeds"])
            if req.num_layers:
                row["random_spread_middle"] = run(req, random_scores(shape, 0))["ppl"]  # the CLI's random: seed rule
            row["magnitude"] = run(req, mag)["ppl"]
        act = run(req, act_scores, other=True)  # what `prune --method activation --reconstruct none` does
        row["activation"], row["activation_other"] = act["ppl"], act["ppl_other"]
        row["params"], row["activation_dropped_layers"] = act["params"], act["dropped_layers"]
        # what `prune --method activation` does (the refit is its default)
        rec = refit(req, act_scores, with_head_ablation=not args.no_ablations)
        row["reconstructed"], row["reconstructed_other"] = rec["ppl"], rec["ppl_other"]
        row["refit_s"], row["refit_cpu_s"] = rec["refit_s"], rec["refit_cpu_s"]
        row["refit_error"], row["refit_head"] = rec["error_sliced_refit"], rec["head"]
        if "ppl_without_head_gain" in rec:
            results["ablations"].setdefault("tied head: final-norm gain refit", {})[name] = {
                "with (default)": rec["ppl"], "without": rec["ppl_without_head_gain"]}
        if args.baselines:
            row["ratio_vs_random"] = row["activation"] / row["random"]
        row["reconstructed_vs_activation"] = row["reconstructed"] / row["activation"]
        row["scoring_plus_refit_vs_forward"] = (scoring_s + rec["refit_s"]) / forward_s
        row["scoring_plus_refit_vs_forward_cpu_time"] = (min(c for _, c in score_t) + rec["refit_cpu_s"]) / min(
            c for _, c in fwd)
        results["shapes"][name] = row
        print(f"{name:12s} {json.dumps({k: v for k, v in row.items() if k != 'description'})}", flush=True)
        save(results, args.output)  # as it goes: a long run that fails later keeps what it measured

    # -- measured choices: aggregation, norm rescaling, GQA, the depth refit, damping
    ab = results["ablations"]
    aggregation_shapes = (("width", "width+depth") if args.all_ablations else ("width+depth",)) if not \
        args.aggregation_only else tuple(args.shapes)
    for name in () if args.no_ablations else [n for n in aggregation_shapes if n in args.shapes]:
        req = SHAPES[name][1]
        ab[f"{name}: aggregation (held-out)"] = {}
        ab[f"{name}: aggregation (other domain)"] = {}
        for agg in ("mean-l2", "mean", "rms"):
            r = run(req, scores[agg], other=True)
            ab[f"{name}: aggregation (held-out)"][agg] = r["ppl"]
            ab[f"{name}: aggregation (other domain)"][agg] = r["ppl_other"]
        print(f"{name}: {ab[f'{name}: aggregation (held-out)']} {ab[f'{name}: aggregation (other domain)']}",
              flush=True)
        if args.all_ablations:
            ab[f"{name}: norm rescale"] = {"sqrt": results["shapes"][name]["activation"],
                                           "none": run(req, act_scores, "none")["ppl"]}
    if args.all_ablations:
        greq = TargetRequest(**GQA_SHAPE[1])
        ab["gqa"] = {"description": GQA_SHAPE[0],
                     "trim-heads (3 groups x 2 heads)": run(greq, act_scores, groups=3)["ppl"],
                     "drop-groups (2 groups x 3 heads)": run(greq, act_scores, groups=2)["ppl"],
                     "random trim-heads (seed 0)": run(greq, random_with_layers(shape, 0), groups=3)["ppl"]}
        print(f"gqa: {ab['gqa']}", flush=True)
    if not (args.no_ablations or args.aggregation_only):
        for name in [n for n in ("depth", "width+depth") if n in args.shapes][: None if args.all_ablations else 1]:
            plain = refit(SHAPES[name][1], act_scores, RefitOptions(depth="none"))
            row = results["shapes"][name]
            ab[f"{name}: depth refit"] = {"residual (default)": row["reconstructed"], "none": plain["ppl"],
                                          "residual, other domain": row["reconstructed_other"],
                                          "none, other domain": plain["ppl_other"]}
            print(f"{name}: {ab[f'{name}: depth refit']}", flush=True)
        if "demo" in args.shapes and args.damping_ablation:
            ab["demo: damping"] = {f"{d:g}": refit(SHAPES["demo"][1], act_scores, RefitOptions(damping=d))["ppl"]
                                   for d in (0.001, 0.1)}
            ab["demo: damping"][f"{RefitOptions().damping:g} (default)"] = results["shapes"]["demo"]["reconstructed"]
            print(f"damping: {ab['demo: damping']}", flush=True)
    shapes = results["shapes"]
    main3 = [n for n in ("width", "width+depth", "demo") if n in shapes]

    def measured(names: list[str], ok) -> bool | None:
        """The target's verdict, or None when this run measured none of its shapes (not a vacuous "met")."""
        return ok() if names else None
    results["targets"] = {
        **({"activation <= 0.1 x random (mean of 3 seeds), every shape":
            measured(list(shapes), lambda: all(r["ratio_vs_random"] <= 0.1 for r in shapes.values()))}
           if args.baselines else {}),
        "scoring <= 1.5 x plain forward": results["timing"]["ratio"] <= 1.5,
        "reconstructed <= 0.5 x activation (width, width+depth, demo; held-out)":
            measured(main3, lambda: all(shapes[n]["reconstructed_vs_activation"] <= 0.5 for n in main3)),
        "reconstructed < activation on the other domain (width, width+depth, demo)":
            measured(main3, lambda: all(shapes[n]["reconstructed_other"] < shapes[n]["activation_other"]
                                        for n in main3)),
        "FFN-only reconstructed <= 1.3 x original": measured(
            [n for n in ("ffn",) if n in shapes],
            lambda: shapes["ffn"]["reconstructed"] <= 1.3 * results["original_ppl"]["held-out"]),
        "depth reconstructed <= 0.8 x block influence": measured(
            [n for n in ("depth",) if n in shapes], lambda: shapes["depth"]["reconstructed_vs_activation"] <= 0.8),
        # this run's own timing (its refit follows a separate scoring pass for every shape); bench/refit_time.py
        # times the steps between plain forwards, as prune runs them
        "scoring + refit <= 3 x plain forward (every shape)":
            measured(list(shapes), lambda: all(r["scoring_plus_refit_vs_forward"] <= 3 for r in shapes.values())),
    }
    results["seconds"] = round(time.time() - t0, 1)
    save(results, args.output)
    print(table(results))
    chart(results, args.chart)
    return 0


def save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


def table(r: dict) -> str:
    o = r["original_ppl"]
    base = all("random" in row for row in r["shapes"].values())
    lines = [f"perplexity, 0 training tokens, {r['eval_tokens']['held-out']} held-out tokens (original "
             f"{o['held-out']:.2f}; other domain {o['other']:.2f})",
             "| shape | params | " + ("random (3 seeds: mean; range) | magnitude | " if base else "")
             + "activation | + reconstruction | other domain: activation / + reconstruction | "
             "scoring + refit vs forward |",
             "|---|---|---|---|---|---|" + ("---|---|" if base else "")]
    for name, row in r["shapes"].items():
        cells = [f"{name}: {row['description']}", f"{row['params'] / 1e6:.0f}M"]
        if base:
            seeds = row["random_seeds"]
            extra = f"; seed rule {row['random_spread_middle']:,.0f}" if "random_spread_middle" in row else ""
            cells += [f"{row['random']:,.0f} ({min(seeds):,.0f}-{max(seeds):,.0f}{extra})", f"{row['magnitude']:,.0f}"]
        cells += [f"{row['activation']:,.1f}", f"**{row['reconstructed']:,.1f}**",
                  f"{row['activation_other']:,.1f} / **{row['reconstructed_other']:,.1f}**",
                  f"{row['scoring_plus_refit_vs_forward']:.2f}x ({row['scoring_plus_refit_vs_forward_cpu_time']:.2f}x "
                  "CPU time)"]
        lines.append("| " + " | ".join(cells) + " |")
    t = r["timing"]
    lines.append(f"scoring {t['scoring_s']:.1f}s vs plain forward {t['plain_forward_s']:.1f}s "
                 f"over {t['tokens']} tokens "
                 f"= {t['ratio']:.2f}x wall ({t['ratio_cpu_time']:.2f}x CPU time)")
    for k, v in r["ablations"].items():
        lines.append(f"{k}: " + ", ".join(f"{a} {b:,.1f}" if isinstance(b, float) else f"{b}" for a, b in v.items()))
    lines += [f"target {k}: {'not measured' if v is None else 'met' if v else 'NOT met'}"
              for k, v in r["targets"].items()]
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
    if not names:  # --aggregation-only: nothing to draw
        return
    series = [("random", "random (mean of 3 seeds)"), ("magnitude", "magnitude"), ("activation", "activation"),
              ("reconstructed", "activation + least-squares refit")]
    series = [(k, label) for k, label in series if all(k in r["shapes"][n] for n in names)]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    w = 0.2
    for j, (key, label) in enumerate(series):
        vals = [r["shapes"][n][key] for n in names]
        bars = ax.bar([i + (j - (len(series) - 1) / 2) * w for i in range(len(names))], vals, w, label=label)
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in vals], fontsize=6)
    ax.axhline(r["original_ppl"]["held-out"], color="k", ls="--", lw=0.8,
               label=f"original {r['original_ppl']['held-out']:.1f}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), [f"{n}\n{r['shapes'][n]['params'] / 1e6:.0f}M" for n in names], fontsize=8)
    ax.set_ylabel("held-out perplexity, 0 training tokens (log)")
    ax.set_title("SmolLM2-135M pruned without training: selection, then refit of the kept weights")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
