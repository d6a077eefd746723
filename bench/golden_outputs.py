"""Developer check for refactors: run every CLI verb on tiny fixtures and on the embedded model, print a hash of
each output (files, stdout, exit code) and write them to OUT/golden.json.

    python bench/golden_outputs.py OLD_CHECKOUT /tmp/gold && cp /tmp/gold/golden.json before.json
    python bench/golden_outputs.py . /tmp/gold && cp /tmp/gold/golden.json after.json   # same OUT: paths are recorded

A refactor that keeps behaviour keeps every hash (the checkout's ``tests/tiny.py`` builds the fixtures; the
checkout's package is imported through PYTHONPATH, ahead of any installed copy).
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from pydoc_data.topics import topics

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("checkout", help="checkout to test")
parser.add_argument("out", help="work folder, wiped first: a new or empty one, or one this script wrote before")
args = parser.parse_args()
ROOT = Path(args.checkout).resolve()
OUT = Path(args.out).resolve()
MARK = OUT / ".golden_outputs"  # says the folder is this script's to wipe (a typo must not wipe a checkout)
if OUT.exists() and (not OUT.is_dir() or any(OUT.iterdir()) and not MARK.exists()):
    parser.error(f"{OUT} is not a folder this script wrote before (it would be wiped): give a new or empty one")
shutil.rmtree(OUT, ignore_errors=True)
OUT.mkdir(parents=True)
MARK.touch()
sys.path.insert(0, str(ROOT / "tests"))
from tiny import make_tiny_hf  # noqa

env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
PY = sys.executable


def cli(*a, ok=True):
    p = subprocess.run([PY, "-m", "megatron.prune", *map(str, a)], cwd=OUT, env=env, capture_output=True, text=True)
    if ok and p.returncode:
        print("FAILED", a, p.stderr[-2000:])
        sys.exit(1)
    text = re.sub(r"\d+\.\d+s\b", "Xs", p.stdout + "\n--stderr--\n" + (p.stderr if p.returncode else ""))
    text = re.sub(r"in [0-9.]+s", "in Xs", text)
    return p.returncode, text


def tree(folder):
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def tensors_hash(path):
    import torch

    d = torch.load(path, weights_only=False)
    h = hashlib.sha256()
    for k in sorted(d):
        if k != "meta" and d[k] is not None:
            h.update(k.encode())
            h.update(d[k].numpy().tobytes() if hasattr(d[k], "numpy") else repr(d[k]).encode())
    return h.hexdigest()[:16]


res = {}


def rec(name, rc_out, folder=None):
    rc, out = rc_out
    res[name] = (rc, hashlib.sha256(out.encode()).hexdigest()[:12], tree(OUT / folder) if folder else "")
    print(name, res[name], flush=True)


tiny = make_tiny_hf(OUT / "tiny", "llama-gqa")
tied = make_tiny_hf(OUT / "tied", "llama-tied")
qwen = make_tiny_hf(OUT / "qwen", "qwen2-bias")
shape = ["--hidden-size", 40, "--num-attention-heads", 4, "--ffn-hidden-size", 48, "--num-layers", 3]
rec("prune-random", cli("prune", "--input", "tiny", "--output", "p-rand", "--no-progress", *shape), "p-rand")
rec(
    "prune-mag",
    cli("prune", "--input", "tiny", "--output", "p-mag", "--method", "magnitude", "--no-progress", *shape),
    "p-mag",
)
rec(
    "prune-tied",
    cli(
        "prune",
        "--input",
        "tied",
        "--output",
        "p-tied",
        "--no-progress",
        "--hidden-size",
        36,
        "--num-attention-heads",
        3,
    ),
    "p-tied",
)
rec(
    "prune-qwen",
    cli(
        "prune",
        "--input",
        "qwen",
        "--output",
        "p-qwen",
        "--method",
        "magnitude",
        "--no-progress",
        "--ffn-hidden-size",
        32,
        "--drop-layers",
        "1",
    ),
    "p-qwen",
)
rec(
    "conv-tp2pp2",
    cli("convert", "hf-to-megatron", "--input", "tiny", "--output", "mg22", "--tp", 2, "--pp", 2, "--no-progress"),
    "mg22",
)
rec(
    "conv-dist",
    cli(
        "convert",
        "hf-to-megatron",
        "--input",
        "tiny",
        "--output",
        "mgd",
        "--tp",
        2,
        "--ckpt-format",
        "torch_dist",
        "--no-progress",
    ),
    None,
)
rec(
    "prune-mg-bal",
    cli(
        "prune",
        "--input",
        "mg22",
        "--output",
        "mg22-p",
        "--method",
        "magnitude",
        "--no-progress",
        "--num-attention-heads",
        4,
        "--ffn-hidden-size",
        32,
    ),
    "mg22-p",
)
rec(
    "prune-mg-unbal",
    cli(
        "prune",
        "--input",
        "mg22",
        "--output",
        "mg-pu",
        "--prune-type",
        "unbalance",
        "--tp",
        1,
        "--no-progress",
        *shape[:6],
        "--num-layers",
        2,
    ),
    "mg-pu",
)
rec(
    "prune-dist",
    cli(
        "prune",
        "--input",
        "mgd",
        "--output",
        "mgd-p",
        "--method",
        "magnitude",
        "--no-progress",
        "--ffn-hidden-size",
        32,
    ),
    "mgd-p",
)
rec("reshard", cli("reshard", "--input", "mg22-p", "--output", "mg-r", "--tp", 1, "--pp", 1, "--no-progress"), "mg-r")
rec(
    "reshard-te",
    cli("reshard", "--input", "mg22", "--output", "mg-te", "--transformer-impl", "transformer_engine", "--no-progress"),
    "mg-te",
)
rec("to-hf", cli("convert", "megatron-to-hf", "--input", "mg-r", "--output", "hf-back", "--no-progress"), "hf-back")
rec(
    "to-hf-dist",
    cli("convert", "megatron-to-hf", "--input", "mgd-p", "--output", "hf-dist", "--no-progress"),
    "hf-dist",
)
rec(
    "conv-tp2",
    cli("convert", "hf-to-megatron", "--input", "tiny", "--output", "mg21", "--tp", 2, "--no-progress"),
    "mg21",
)
rec(
    "plan-apply",
    cli(
        "prune",
        "--input",
        "mg21",
        "--output",
        "mg-plan",
        "--plan",
        "p-mag/prune_plan.json",
        "--prune-type",
        "unbalance",
        "--no-progress",
    ),
    "mg-plan",
)
rec("bad-target", cli("prune", "--input", "tiny", "--output", "bad", "--hidden-size", 999, ok=False))
# real model paths
sys.path.insert(0, str(ROOT))
from megatron.prune.models import embedded_model_dir  # noqa

M = embedded_model_dir()
small = ["--num-layers", 26, "--hidden-size", 504, "--num-attention-heads", 6, "--ffn-hidden-size", 1024]
rc, out = cli("score", "--model", M, "--output", "scores.pt", "--samples", 8, "--seq-len", 128, "--no-progress")
res["score"] = (rc, tensors_hash(OUT / "scores.pt"))
print("score", res["score"])
rc, out = cli(
    "score",
    "--model",
    M,
    "--output",
    "scores-lw.pt",
    "--samples",
    8,
    "--seq-len",
    128,
    "--no-progress",
    "--layer-by-layer",
    "always",
)
res["score-lw"] = (rc, tensors_hash(OUT / "scores-lw.pt"))
print("score-lw", res["score-lw"])
rec(
    "prune-auto",
    cli("prune", "--input", M, "--output", "s-auto", "--samples", 8, "--seq-len", 128, "--no-progress", *small),
    "s-auto",
)
rec(
    "prune-scores",
    cli(
        "prune",
        "--input",
        M,
        "--output",
        "s-sc",
        "--method",
        "activation",
        "--scores",
        "scores.pt",
        "--no-progress",
        "--drop-layers",
        "auto",
        "--num-layers",
        25,
    ),
    "s-sc",
)
rec("eval", cli("eval", "--model", "s-auto", "--max-tokens", 2048, "--no-progress"))
rec("eval-lw", cli("eval", "--model", "s-auto", "--max-tokens", 2048, "--no-progress", "--layer-by-layer", "always"))
rec(
    "conv-real",
    cli("convert", "hf-to-megatron", "--input", "s-auto", "--output", "mg-real", "--tp", 2, "--no-progress"),
    "mg-real",
)
rec("eval-mg", cli("eval", "--model", "mg-real", "--max-tokens", 2048, "--no-progress"))
rec(
    "prune-mg-auto",
    cli(
        "prune",
        "--input",
        "mg-real",
        "--output",
        "mg-real-p",
        "--samples",
        4,
        "--seq-len",
        64,
        "--no-progress",
        "--ffn-hidden-size",
        512,
    ),
    "mg-real-p",
)
(OUT / "corpus.txt").write_text("\n\n".join(topics[k] for k in sorted(topics))[:60000])
rec(
    "vocab-count",
    cli("vocab", "count", "--tokenizer", M, "--data", "corpus.txt", "--output", "counts.json", "--no-progress"),
    None,
)
res["counts"] = hashlib.sha256((OUT / "counts.json").read_bytes()).hexdigest()[:16]
rec(
    "vocab-prune",
    cli(
        "vocab",
        "prune",
        "--input",
        "s-auto",
        "--output",
        "s-vocab",
        "--keep",
        4000,
        "--counts",
        "counts.json",
        "--no-progress",
    ),
    "s-vocab",
)
(OUT / "d").mkdir()
rec("data", cli("data", "--input", "corpus.txt", "--output-prefix", "d/corpus", "--tokenizer", M, "--no-progress"), "d")
(OUT / "golden.json").write_text(json.dumps(res, indent=1))
