"""Peak memory of the least-squares refit at a 70B layer's shape, measured instead of estimated from the shapes.

    python bench/refit_memory.py                  # Llama-3-70B layers and vocabulary, 2 layers, 64 x 256 calibration
    python bench/refit_memory.py --layers 2 --hidden 2048 --ffn 5632 --heads 16 --groups 4 --vocab 49152 \
        --to-hidden 1536 --to-heads 12 --to-groups 3 --to-ffn 2816 --samples 16      # a quick look

Writes a random LLaMA checkpoint (bf16 safetensors, untied, the embedded model's tokenizer; Llama-3-70B's hidden
8192, 64 heads / 8 groups, FFN 28672 and vocabulary 128256 by default, with as few layers as asked: the refit holds
one layer at a time, so its peak does not grow with depth once a layer follows another, which 2 layers show), then
runs `megatron-prune prune` on it with the refit on (every axis but depth pruned, float32, layer by layer) in a fresh
process and prints that process's peak RSS and wall time (from `wait4`) beside the RSS of the imports alone. Writes
bench/results/refit_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from layerwise_memory import imports_rss, parsed_or_written, run, shape_arguments, written_in_child

RESULTS = Path(__file__).resolve().parent / "results" / "refit_memory.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_arguments(p, layers=2, hidden=8192, ffn=28672, heads=64, groups=8, vocab=128256, to_hidden=6144,
                    to_heads=48, to_groups=6, to_ffn=14336, samples=64, seq_len=256)
    args = parsed_or_written(p, untied=True)
    if args is None:
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        folder = written_in_child(__file__, tmp)
        imports = imports_rss("torch, transformers, megatron.prune.refit.sequential, megatron.prune.scoring.layerwise")
        rss, wall = run([sys.executable, "-m", "megatron.prune", "prune", "--input", str(folder), "--output",
                         str(Path(tmp) / "out"), "--hidden-size", str(args.to_hidden), "--num-attention-heads",
                         str(args.to_heads), "--num-query-groups", str(args.to_groups), "--ffn-hidden-size",
                         str(args.to_ffn), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
                         "--dtype", "float32", "--device", "cpu", "--layer-by-layer", "always", "--no-progress"])
    shape = {k: getattr(args, k) for k in ("layers", "hidden", "ffn", "heads", "groups", "vocab")}
    target = {k: getattr(args, f"to_{k}") for k in ("hidden", "heads", "groups", "ffn")}
    result = {"shape": shape, "target": target, "calibration_tokens": args.samples * args.seq_len,
              "peak_rss_gib": round(rss, 2), "imports_rss_gib": round(imports, 2), "wall_s": round(wall, 1)}
    print(f"imports alone: peak RSS {imports:.2f} GiB")
    print(f"prune + refit {shape} -> {target}, {args.samples} x {args.seq_len} tokens, float32: "
          f"peak RSS {rss:.2f} GiB, {wall:.0f} s")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
