"""Peak memory of activation scoring: the whole model in memory vs one decoder layer at a time.

    python bench/layerwise_memory.py                    # 0.8B LLaMA shape (16 layers, hidden 2048), float32 scoring
    python bench/layerwise_memory.py --layers 8 --hidden 1024 --ffn 2816

Writes a random LLaMA-shaped HF checkpoint (bf16 safetensors, the embedded model's tokenizer), then runs
`megatron-prune score` on it with `--layer-by-layer never` and `always`, each in a fresh process, and prints each
one's peak RSS and wall time (from `wait4`), their ratio, the RSS of the imports alone, and whether the two score
files are identical. This process imports no torch until the runs are done: a child's peak RSS counts its
parent's memory at the fork, so the checkpoint is written by a child of its own too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_model(folder: Path, args: argparse.Namespace) -> int:
    """A random LLaMA checkpoint of the asked shape with the embedded model's tokenizer; its parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from megatron.prune.models import embedded_model_dir

    config = LlamaConfig(vocab_size=getattr(args, "vocab", 49152), hidden_size=args.hidden,
                         intermediate_size=args.ffn, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.groups, tie_word_embeddings=not getattr(args, "untied", False),
                         max_position_embeddings=2048)
    with torch.device("meta"):
        names = {n: p.shape for n, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    g = torch.Generator().manual_seed(0)
    tensors = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in names.items()}
    for n in tensors:
        if n.endswith("norm.weight"):
            tensors[n] = torch.ones_like(tensors[n])
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config.dtype, config.architectures = "bfloat16", ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    src = embedded_model_dir()
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, folder / name)
    return sum(t.numel() for t in tensors.values())


def parsed_or_written(p: argparse.ArgumentParser, **fixed) -> argparse.Namespace | None:
    """The command line's flags (``fixed`` set on them); in the child started by :func:`written_in_child`
    (``--write FOLDER``), the checkpoint written there, its size printed, and None."""
    p.add_argument("--write", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    vars(args).update(fixed)
    if args.write is None:
        return args
    n = write_model(args.write, args)
    print(f"model: {args.layers} layer(s), hidden {args.hidden}, FFN {args.ffn}, vocabulary "
          f"{getattr(args, 'vocab', 49152)}: {n / 1e9:.2f}B parameters, {n * 2 / 2**30:.2f} GiB in bfloat16")
    return None


def written_in_child(script: str, tmp: str) -> Path:
    """``tmp``/model, written by ``SCRIPT --write`` (this command line's flags) in a child of its own."""
    folder = Path(tmp) / "model"
    subprocess.run([sys.executable, script, "--write", str(folder), *sys.argv[1:]], check=True)
    return folder


def imports_rss(modules: str) -> float:
    """Peak RSS (GiB) of a fresh process that imports ``modules`` (a comma-separated list) and nothing else."""
    return run([sys.executable, "-c", f"import {modules}"])[0]


def shape_arguments(p: argparse.ArgumentParser, **defaults: int) -> None:
    """The model-shape and calibration flags (``--layers``, ``--hidden``, ... ``--seq-len``) with these defaults."""
    for name, value in defaults.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)


def run(cmd: list[str]) -> tuple[float, float]:
    """Peak RSS (GiB) and wall seconds of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return usage.ru_maxrss / 2**20, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_arguments(p, layers=16, hidden=2048, ffn=5632, heads=16, groups=4, samples=16, seq_len=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parsed_or_written(p)
    if args is None:
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        folder = written_in_child(__file__, tmp)
        imports = imports_rss("torch, transformers, megatron.prune.scoring.methods, megatron.prune.scoring.layerwise")
        result = {}
        for mode in ("never", "always"):
            out = Path(tmp) / f"{mode}.pt"
            result[mode] = run([sys.executable, "-m", "megatron.prune", "score", "--model", str(folder), "--output",
                                str(out), "--layer-by-layer", mode, "--samples", str(args.samples), "--seq-len",
                                str(args.seq_len), "--dtype", args.dtype, "--no-progress"])
        import torch

        a, b = (torch.load(Path(tmp) / f"{m}.pt", weights_only=True) for m in ("never", "always"))
        same = all(torch.equal(v, b[k]) for k, v in a.items() if isinstance(v, torch.Tensor))
    print(f"imports alone: peak RSS {imports:.2f} GiB")
    for mode, (rss, wall) in result.items():
        print(f"--layer-by-layer {mode:6s}: peak RSS {rss:.2f} GiB, {wall:.1f} s")
    (whole, t_whole), (layered, t_layered) = result["never"], result["always"]
    print(f"RSS ratio layer-by-layer / whole: {layered / whole:.2f} "
          f"({(layered - imports) / (whole - imports):.2f} without the imports); time ratio {t_layered / t_whole:.2f}")
    print(f"scores identical: {same}")


if __name__ == "__main__":
    main()
