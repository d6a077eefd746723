"""Recovery benchmark (CPU): how fast does training win back what pruning lost, LM loss vs distillation, from a
reconstructed start vs a selection-only one?

Prunes the embedded SmolLM2-135M to the demo shape with ``--method activation``, once with the least-squares refit
(``--reconstruct least-squares``, the default: start ``refit``) and once without (``--reconstruct none``: start
``selection``), converts each (and the unpruned teacher) to Megatron, tokenizes the built-in calibration text, then
runs the stock Megatron loop through ``scripts/check_model.sh`` from each start for the same fixed budget:
  (a) ``lm``: plain next-token loss;
  (b) ``kd``: distillation from the unpruned model (``--kd-alpha 1``, T=1: pure logit KL).
Every ``--eval-every`` iterations the loop saves the model; each saved iteration is exported with
``megatron_to_hf`` and its perplexity measured on the built-in held-out text with
``megatron.prune.perplexity.perplexity`` (the same number ``megatron-prune eval``/``demo`` print).

    .venv/bin/python bench/recovery.py               # ~10-15 min on 2 CPU cores
    .venv/bin/python bench/recovery.py --iters 4 --eval-every 2   # smoke run

Writes bench/results/recovery.json and assets/recovery.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from megatron.prune.commands.demo import DEMO_SHAPE
from megatron.prune.perplexity import perplexity
from megatron.prune.runtime import load_hf, tokenize
from megatron.prune.formats.mcore.ops import hf_to_megatron, megatron_to_hf
from megatron.prune.models import cache_root, embedded_model_dir
from megatron.prune.text import builtin_text

ROOT = Path(__file__).resolve().parent.parent
ITER_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+\-]+) \|(?:.*?kd loss: ([0-9.E+\-]+) \|)?")
MODES = {"lm": {}, "kd": {"KD_ALPHA": "1", "KD_TEMPERATURE": "1.0"}}
STARTS = {"refit": "least-squares", "selection": "none"}  # start -> prune --reconstruct


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=30, help="training iterations per run (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=10, help="iterations between perplexity points")
    p.add_argument("--seq-len", type=int, default=128, help="training sequence length")
    p.add_argument("--global-batch", type=int, default=4, help="sequences per iteration")
    p.add_argument("--lr", type=float, default=3e-4, help="peak LR (cosine to LR/10, 2 warm-up iterations)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for perplexity")
    p.add_argument("--eval-seq-len", type=int, default=512, help="perplexity window (as the demo)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default <cache>/recovery-bench)")
    p.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    p.add_argument("--starts", nargs="+", choices=list(STARTS), default=list(STARTS),
                   help="pruned starts: refit (least-squares reconstruction) and/or selection (sliced weights only)")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "recovery.json")
    p.add_argument("--chart", type=Path, default=ROOT / "assets" / "recovery.png")
    a = p.parse_args(argv)
    if a.iters < 1 or a.eval_every < 1 or a.iters % a.eval_every:
        p.error(f"--iters {a.iters} must be a positive multiple of --eval-every {a.eval_every}")
    return a


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(work: Path, starts: list[str]) -> dict[str, Path]:
    """Pruned HF models (activation; per start), their and the teacher's Megatron checkpoints, calibration data."""
    from megatron.prune.cli import build_parser
    from megatron.prune.data import preprocess

    src = embedded_model_dir()
    flags = [x for k, v in DEMO_SHAPE.items() for x in (f"--{k}", str(v))]
    paths = {"src": src}
    for start in starts:
        pruned_hf = work / f"pruned_hf_{start}"
        args = build_parser(["prune"]).parse_args(["prune", "--input", str(src), "--output", str(pruned_hf),
                                                   "--method", "activation", "--reconstruct", STARTS[start],
                                                   "--overwrite", "--no-progress", *flags])
        args._run(args)
        paths[f"pruned_hf_{start}"] = pruned_hf
        paths[f"pruned_mg_{start}"] = hf_to_megatron(pruned_hf, work / f"pruned_mg_{start}", overwrite=True,
                                                     progress=False)
    paths["teacher_mg"] = hf_to_megatron(src, work / "teacher_mg", overwrite=True, progress=False)
    (work / "calib.txt").write_text(builtin_text("calib"))
    summary = preprocess(work / "calib.txt", work / "calib", paths[f"pruned_hf_{starts[0]}"], overwrite=True,
                         progress=False)
    print(f"calibration data: {summary}")
    return {**paths, "data": Path(str(summary.bin_path)[: -len(".bin")])}


def train(mode: str, start: str, paths: dict[str, Path], a: argparse.Namespace,
          save: Path) -> tuple[dict[int, dict], float]:
    """One recovery run through scripts/check_model.sh; iteration -> printed losses, and seconds taken."""
    env = {**os.environ, "PYTHON": sys.executable, "MASTER_PORT": str(_free_port()),
           "LOAD": str(paths[f"pruned_mg_{start}"]), "SAVE": str(save), "DATA": str(paths["data"]),
           "TOKENIZER": str(paths[f"pruned_hf_{start}"]), "TRAIN_ITERS": str(a.iters),
           "SAVE_INTERVAL": str(a.eval_every),
           "SEQ_LEN": str(a.seq_len), "MICRO_BATCH": str(a.global_batch), "GLOBAL_BATCH": str(a.global_batch),
           "LR": str(a.lr), "WARMUP": "2", **MODES[mode]}
    if mode == "kd":
        env["KD_TEACHER"] = str(paths["teacher_mg"])
    cmd = ["bash", str(ROOT / "scripts/check_model.sh"), "--no-save-optim", "--no-save-rng",
           "--data-cache-path", str(save.parent / f"cache_{mode}")]
    t0, losses = time.time(), {}
    with subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        tail = []
        for line in p.stdout:
            tail = (tail + [line])[-60:]
            m = ITER_RE.search(line)
            if m:
                it, lm, kd = int(m.group(1)), float(m.group(2)), m.group(3)
                losses[it] = {"lm": lm, **({"kd": float(kd)} if kd else {})}
                print(f"  [{mode}, {start}] iteration {it}: lm loss {lm:.4f}"
                      + (f", kd loss {float(kd):.4f}" if kd else ""),
                      flush=True)
    if p.returncode:
        raise SystemExit(f"{mode}, {start} run failed (exit {p.returncode}):\n" + "".join(tail))
    return losses, time.time() - t0


def hf_perplexity(folder: Path, ids: torch.Tensor, a: argparse.Namespace) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    return perplexity(model, ids, a.eval_seq_len, progress=False).perplexity


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, run in result["runs"].items():
        its = sorted(int(i) for i in run["perplexity"])
        ax1.plot(its, [run["perplexity"][str(i)] for i in its], marker="o", label=f"{mode} (recovering)")
        lits = sorted(int(i) for i in run["train_loss"])
        ax2.plot(lits, [run["train_loss"][str(i)]["lm"] for i in lits], label=f"{mode}: train LM loss")
    ax1.axhline(result["perplexity_unpruned"], color="gray", ls="--", label="unpruned 135M")
    ax1.set(xlabel="iteration", ylabel="held-out perplexity", yscale="log",
            title=f"SmolLM2-135M pruned to {result['pruned_params'] / 1e6:.0f}M: recovery")
    ax2.set(xlabel="iteration", ylabel="LM loss (training batches)", title="training LM loss")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    work = a.work or cache_root() / "recovery-bench"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    paths = prepare(work, a.starts)
    _, tok = load_hf(paths[f"pruned_hf_{a.starts[0]}"])
    ids = tokenize(tok, builtin_text("eval"), a.eval_tokens)
    ppl0, pruned_params = {}, 0
    for start in a.starts:
        model, _ = load_hf(paths[f"pruned_hf_{start}"])
        ppl0[start] = perplexity(model, ids, a.eval_seq_len, progress=False).perplexity
        pruned_params = sum(p.numel() for p in model.parameters())
        del model
    ppl_src = hf_perplexity(paths["src"], ids, a)
    print(f"unpruned perplexity {ppl_src:.2f}; pruned ({pruned_params / 1e6:.1f}M) before training {ppl0} "
          f"[prep {time.time() - t0:.0f}s]", flush=True)
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "shape": DEMO_SHAPE, "method": "activation", "tokens_per_iteration": a.seq_len * a.global_batch,
              "pruned_params": pruned_params, "perplexity_unpruned": ppl_src, "runs": {}}
    for start in a.starts:
        for mode in a.modes:
            save = work / f"run_{mode}_{start}"
            shutil.rmtree(save, ignore_errors=True)
            losses, seconds = train(mode, start, paths, a, save)
            ppl = {"0": ppl0[start]}
            for it in range(a.eval_every, a.iters + 1, a.eval_every):
                hf = megatron_to_hf(save, work / "export", overwrite=True, progress=False, iteration=it)
                ppl[str(it)] = hf_perplexity(hf, ids, a)
                print(f"  [{mode}, {start}] iteration {it}: held-out perplexity {ppl[str(it)]:.2f}", flush=True)
            result["runs"][f"{mode}, {start}"] = {"seconds": round(seconds, 1), "perplexity": ppl,
                                                  "train_loss": {str(k): v for k, v in sorted(losses.items())}}
    result["total_seconds"] = round(time.time() - t0, 1)
    out = a.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, a.chart)
    print(f"\nheld-out perplexity (unpruned {ppl_src:.2f}), {a.seq_len * a.global_batch} tokens/iteration:")
    its = sorted({int(i) for run in result["runs"].values() for i in run["perplexity"]})
    print(f"{'iteration':>10} " + " ".join(f"{m:>16}" for m in result["runs"]))
    for i in its:
        print(f"{i:>10} " + " ".join(f"{result['runs'][m]['perplexity'].get(str(i), float('nan')):>16.2f}"
                                     for m in result["runs"]))
    print(f"wrote {out} and {a.chart} in {result['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
