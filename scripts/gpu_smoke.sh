#!/usr/bin/env bash
# One short single-GPU smoke run (a few minutes): prune the embedded SmolLM2-135M to the demo shape,
# convert it to Megatron (TP=1), tokenize the built-in text, then 50 iterations of recovery in bf16
# on the stock loop; prints tokens/s and model FLOPs utilisation (MFU) from the loop's own timing.
#   bash scripts/gpu_smoke.sh            (WORK=/tmp/mp-gpu-smoke ITERS=50 SEQ_LEN=2048 GLOBAL_BATCH=16)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
WORK="${WORK:-/tmp/mp-gpu-smoke}"; ITERS="${ITERS:-50}"; SEQ_LEN="${SEQ_LEN:-2048}"
MICRO_BATCH="${MICRO_BATCH:-4}"; GLOBAL_BATCH="${GLOBAL_BATCH:-16}"
mkdir -p "$WORK"

"$PYTHON" - "$WORK" <<'PY'
import sys
from pathlib import Path
from megatron.prune.cli import main
from megatron.prune.commands.demo import DEMO_SHAPE
from megatron.prune.megatron_ckpt import hf_to_megatron
from megatron.prune.models import embedded_model_dir
from megatron.prune.text import builtin_text

work = Path(sys.argv[1])
src = embedded_model_dir()
pruned, mg = work / "pruned_hf", work / "pruned_mg"
if not pruned.exists():
    shape = [x for k, v in DEMO_SHAPE.items() for x in (f"--{k}", str(v))]
    assert main(["prune", "--input", str(src), "--output", str(pruned), *shape]) == 0
if not mg.exists():
    hf_to_megatron(pruned, mg, tp=1)
text = work / "text.txt"
text.write_text(builtin_text("calib"))
if not (work / "text_text_document.bin").exists():
    assert main(["data", "--input", str(text), "--output-prefix", str(work / "text"),
                 "--tokenizer", str(pruned), "--no-progress"]) == 0
PY

log="$WORK/train.log"
LOAD="$WORK/pruned_mg" DATA="$WORK/text_text_document" TOKENIZER="$WORK/pruned_hf" TP=1 \
  TRAIN_ITERS="$ITERS" SEQ_LEN="$SEQ_LEN" MICRO_BATCH="$MICRO_BATCH" GLOBAL_BATCH="$GLOBAL_BATCH" \
  LR=1e-4 LOG_INTERVAL=1 PRECISION=bf16 PYTHON="$PYTHON" \
  bash "$here/scripts/check_model.sh" --transformer-impl transformer_engine \
  --max-position-embeddings "$SEQ_LEN" --seq-length "$SEQ_LEN" 2>&1 | tee "$log"

"$PYTHON" - "$log" "$WORK/pruned_hf" "$SEQ_LEN" "$GLOBAL_BATCH" <<'PY'
import json, re, sys
import torch
log, hf, seq, gbs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ms = [float(x) for x in re.findall(r"elapsed time per iteration \(ms\): ([0-9.]+)", open(log).read())]
steady = ms[5:] or ms  # skip warm-up iterations
step_s = sum(steady) / len(steady) / 1000.0
cfg = json.load(open(f"{hf}/config.json"))
h, L, f, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
hd = cfg.get("head_dim") or h // heads
n_matmul = L * (h * hd * (heads + 2 * kv) + heads * hd * h + 3 * h * f) + v * h  # + lm head
flops_per_token = 6 * n_matmul + 6 * L * seq * heads * hd  # causal attention (fwd+bwd, halved)
tokens_s = gbs * seq / step_s
name = torch.cuda.get_device_name(0)
peak = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
peak_flops = next((p for k, p in peak.items() if k in name), None)
print(f"device: {name}")
print(f"steady step time: {step_s * 1000:.1f} ms over {len(steady)} iterations")
print(f"tokens/s: {tokens_s:,.0f}")
if peak_flops:
    print(f"MFU: {100 * tokens_s * flops_per_token / peak_flops:.1f}% (bf16 dense peak {peak_flops / 1e12:.0f} TFLOP/s)")
PY
