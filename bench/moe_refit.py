"""The least-squares refit on a mixture-of-experts model, measured on real weights: the embedded SmolLM2-135M
upcycled into a Mixtral whose FFN is split into 8 experts of 192 channels, all active (top-8, a zero router: every
expert weighs 1/8, so each down_proj is scaled by 8). That MoE model computes what the dense one does (its perplexity
is checked equal), so pruning each expert's FFN (and the hidden size) can be compared with pruning the dense FFN to
the same width, sliced and refit, through the real ``prune`` command (activation selection, the CLI's calibration).

What it cannot measure: routing. With every expert active the router stays zero and the top-k is fixed; dropping
experts here would only rescale the rest (their weights renormalise to 1/6), which says nothing about a trained MoE.
No trained MoE model is available offline.

    .venv/bin/python bench/moe_refit.py          # ~25 min on 2 CPU cores

Writes bench/results/moe_refit.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from quality import other_domain_text  # noqa: E402

from megatron.prune.cli import main as cli  # noqa: E402
from megatron.prune.models import embedded_model_dir  # noqa: E402
from megatron.prune.perplexity import perplexity  # noqa: E402
from megatron.prune.runtime import load_hf, tokenize  # noqa: E402
from megatron.prune.text import builtin_text  # noqa: E402

EXPERTS = 8
SHAPES = {  # name -> (dense flags, MoE flags): the same widths
    "ffn": (["--ffn-hidden-size", "1024"], ["--moe-ffn-hidden-size", "128"]),
    "width": (["--hidden-size", "468", "--ffn-hidden-size", "1024"],
              ["--hidden-size", "468", "--moe-ffn-hidden-size", "128"]),
}
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def upcycle(dense: Path, out: Path) -> Path:
    """The dense LLaMA in ``dense`` as a Mixtral of :data:`EXPERTS` equal slices of its FFN, all active."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    model, _ = load_hf(dense)
    c = model.config
    F = c.intermediate_size // EXPERTS
    cfg = MixtralConfig(hidden_size=c.hidden_size, intermediate_size=F, num_hidden_layers=c.num_hidden_layers,
                        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                        head_dim=c.head_dim, vocab_size=c.vocab_size, max_position_embeddings=c.max_position_embeddings,
                        rms_norm_eps=c.rms_norm_eps, rope_parameters=c.rope_parameters,
                        tie_word_embeddings=c.tie_word_embeddings, num_local_experts=EXPERTS,
                        num_experts_per_tok=EXPERTS, router_jitter_noise=0.0, sliding_window=None,
                        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)
    cfg.architectures = ["MixtralForCausalLM"]
    moe = AutoModelForCausalLM.from_config(cfg).eval()
    state = model.state_dict()
    new = {}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        gate, up, down = (state[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
        new[p + "mlp.gate.weight"] = torch.zeros(EXPERTS, c.hidden_size)
        new[p + "mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([gate[e * F:(e + 1) * F], up[e * F:(e + 1) * F]]) for e in range(EXPERTS)])
        new[p + "mlp.experts.down_proj"] = torch.stack([EXPERTS * down[:, e * F:(e + 1) * F] for e in range(EXPERTS)])
    new.update({k: v for k, v in state.items() if ".mlp." not in k})
    missing, unexpected = moe.load_state_dict(new, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"upcycling: missing {missing}, unexpected {unexpected}")
    moe.save_pretrained(out)
    for name in TOKENIZER:
        if (dense / name).is_file():
            shutil.copy(dense / name, out / name)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--kinds", nargs="+", choices=["dense", "moe"], default=["dense", "moe"])
    ap.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "moe_refit.json")
    args = ap.parse_args(argv)
    t0 = time.time()
    dense = embedded_model_dir()
    _, tok = load_hf(dense)
    texts = {"held-out": tokenize(tok, builtin_text("eval"), args.eval_tokens),
             "other": tokenize(tok, other_domain_text(), args.eval_tokens)}

    def ppl(folder: Path) -> dict[str, float]:
        model, _ = load_hf(folder)
        return {k: perplexity(model, ids, seq_len=512, batch_size=4, progress=False).perplexity
                for k, ids in texts.items()}

    results: dict = {"model": f"SmolLM2-135M-Instruct, and as a Mixtral of {EXPERTS} FFN slices (all active)",
                     "eval_tokens": {k: int(v.numel()) for k, v in texts.items()}, "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        moe = upcycle(dense, Path(tmp) / "moe")
        results["original"] = {"dense": ppl(dense), "moe": ppl(moe)}
        print(f"original: {results['original']}", flush=True)
        for name in args.shapes:
            row = results["shapes"][name] = {}
            for kind, src, flags in (("dense", dense, SHAPES[name][0]), ("moe", moe, SHAPES[name][1])):
                if kind not in args.kinds:
                    continue
                for refit in ("none", "least-squares"):
                    out = Path(tmp) / f"{name}-{kind}-{refit}"
                    t = time.time()
                    code = cli(["prune", "--input", str(src), "--output", str(out), *flags, "--reconstruct", refit,
                                "--device", "cpu", "--no-progress"])
                    if code:
                        raise SystemExit(f"prune {kind} {name} --reconstruct {refit} failed ({code})")
                    row[f"{kind} {refit}"] = {**ppl(out), "prune_seconds": round(time.time() - t, 1)}
                    print(f"{name} {kind} {refit}: {row[f'{kind} {refit}']}", flush=True)
                    shutil.rmtree(out)
    results["seconds"] = round(time.time() - t0, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


def table(r: dict) -> str:
    o = r["original"]
    lines = [f"perplexity, 0 training tokens, {r['eval_tokens']['held-out']} tokens each (original dense "
             f"{o['dense']['held-out']:.2f} / {o['dense']['other']:.2f}; as MoE {o['moe']['held-out']:.2f} / "
             f"{o['moe']['other']:.2f}): held-out / other domain",
             "| shape | dense sliced | dense refit | MoE sliced | MoE refit |", "|---|---|---|---|---|"]
    for name, row in r["shapes"].items():
        cells = [f"{row[k]['held-out']:.2f} / {row[k]['other']:.2f}" if k in row else "" for k in
                 ("dense none", "dense least-squares", "moe none", "moe least-squares")]
        lines.append(f"| {name}: {' '.join(SHAPES[name][1])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
