"""What scoring and the least-squares refit cost, as multiples of one plain forward over the same calibration tokens
(the issue's target: scoring + refit <= 3 x), on the embedded SmolLM2-135M, CPU.

Each measured step is bracketed by plain forwards in the same process (forward, scoring, forward, refit, forward,
...), and each step is divided by the mean of the two forwards around it, in wall time and in CPU time: a machine
whose load changes during the run moves the step and its baseline together. Perplexity is bench/quality.py's job.

    .venv/bin/python bench/refit_time.py                       # width, ffn, demo at the CLI's 64 x 256 tokens
    .venv/bin/python bench/refit_time.py --shapes ffn --samples 16   # quicker

Writes bench/results/refit_time.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import SHAPES, time_forward
from transformers import AutoConfig

from megatron.prune.core import plan as plan_mod
from megatron.prune.core.select import Scores, make_plan
from megatron.prune.core.target import resolve_target
from megatron.prune.formats.hf import HFCheckpoint
from megatron.prune.models import embedded_model_dir
from megatron.prune.refit.sequential import FusedSelection, RefitOptions, fusable, refit_model
from megatron.prune.refit.store import RefitStore
from megatron.prune.runtime import load_hf, tokenize
from megatron.prune.scoring import methods, stats
from megatron.prune.text import builtin_text


def timed(step: Callable[[], object]) -> tuple[float, float, object]:
    """(wall, CPU seconds, result) of ``step()``."""
    t, c = time.perf_counter(), time.process_time()
    out = step()
    return time.perf_counter() - t, time.process_time() - c, out


def ratio(step: tuple[float, float], before: tuple[float, float], after: tuple[float, float]) -> tuple[float, float]:
    """``step`` over the mean of the forwards around it: (wall, CPU time)."""
    return tuple(s / ((b + a) / 2) for s, b, a in zip(step, before, after))  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["width", "ffn", "demo"])
    ap.add_argument("--samples", type=int, default=methods.DEFAULT_SAMPLES)
    ap.add_argument("--seq-len", type=int, default=methods.DEFAULT_SEQ_LEN)
    ap.add_argument("--no-fused", action="store_true",
                    help="time the refit after the scoring pass even where prune chooses per-layer units inside it")
    ap.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "refit_time.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    folder = embedded_model_dir()
    ckpt, (model, tok) = HFCheckpoint.open(folder), load_hf(folder)
    calib = methods.calibration_windows(tokenize(tok, builtin_text("calib"), None), args.samples, args.seq_len)
    bs = methods.DEFAULT_BATCH_SIZE

    def forward() -> tuple[float, float]:
        return time_forward(model, calib, bs)

    time_forward(model, calib[:bs], bs)  # warm-up
    f0 = forward()
    *score_t, scores = timed(lambda: stats.collect_scores(model, ckpt.shape, calib, bs, stats.DEFAULT_AGGREGATION,
                                                          progress=False))
    f1 = forward()
    scoring = ratio(tuple(score_t), f0, f1)
    results: dict = {"tokens": int(calib.numel()), "threads": torch.get_num_threads(),
                     "scoring_vs_forward": {"wall": scoring[0], "cpu": scoring[1]},
                     "forwards_wall_cpu_s": [f0, f1], "shapes": {}}
    print(f"scoring: {scoring[0]:.2f} x a forward (wall), {scoring[1]:.2f} x (CPU time); forward {f0[0]:.1f}s",
          flush=True)
    before = f1
    for name in args.shapes:
        target, drop = resolve_target(ckpt.shape, SHAPES[name][1])
        plan = plan_mod.norm_rescale(make_plan(ckpt.shape, target, scores, drop), "sqrt")
        # as `prune` runs it: a plan with per-layer axes only is chosen inside the refit's pass (no scoring pass)
        select = FusedSelection(stats.DEFAULT_AGGREGATION) if fusable(plan) and not args.no_fused else None
        if select is not None:
            plan = plan_mod.norm_rescale(make_plan(ckpt.shape, target, Scores.zeros(ckpt.shape), drop), "sqrt")
        with tempfile.TemporaryDirectory(prefix="bench-refit-") as scratch:
            *refit_t, _ = timed(lambda p=plan, d=scratch, f=select: refit_model(
                ckpt, AutoConfig.from_pretrained(folder), p, calib, bs, torch.float32, "cpu", RefitStore(Path(d)),
                RefitOptions(), progress=False, select=f))
        after = forward()
        refit = ratio(tuple(refit_t), before, after)
        total = refit if select else (scoring[0] + refit[0], scoring[1] + refit[1])
        results["shapes"][name] = {"description": SHAPES[name][0], "refit_s": refit_t,
                                   "scored_in_the_refit_pass": select is not None,
                                   "refit_vs_forward": {"wall": refit[0], "cpu": refit[1]},
                                   "scoring_plus_refit_vs_forward": {"wall": total[0], "cpu": total[1]},
                                   "forwards_wall_cpu_s": [before, after]}
        how = "scoring in the refit pass" if select else "scoring + refit"
        print(f"{name}: refit {refit[0]:.2f} x a forward (wall), {refit[1]:.2f} x (CPU); {how} "
              f"{total[0]:.2f} x / {total[1]:.2f} x", flush=True)
        before = after
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1))
    print("| shape | scoring ÷ forward | refit ÷ forward | scoring + refit ÷ forward (wall; CPU time) |")
    print("|---|---|---|---|")
    for name, row in results["shapes"].items():
        s, r, t = results["scoring_vs_forward"], row["refit_vs_forward"], row["scoring_plus_refit_vs_forward"]
        scored = "in the refit pass" if row["scored_in_the_refit_pass"] else f"{s['wall']:.2f}; {s['cpu']:.2f}"
        print(f"| {name} | {scored} | {r['wall']:.2f}; {r['cpu']:.2f} | **{t['wall']:.2f}**; {t['cpu']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
