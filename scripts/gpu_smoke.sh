#!/usr/bin/env bash
# One short single-GPU smoke run (a few minutes): 50 iterations of recovery in bf16 on the stock loop for the
# embedded SmolLM2-135M pruned to the demo shape, TP=1; prints tokens/s and model FLOPs utilisation (MFU) from
# the loop's own timing (megatron.prune.training.throughput; Megatron's --log-throughput figure beside it).
#
#   bash scripts/gpu_smoke.sh       (WORK=/tmp/mp-gpu-smoke ITERS=50 SEQ_LEN=2048 MICRO_BATCH=16 GLOBAL_BATCH=16
#                                    KD_ITERS=10 SMOKE_FLAGS="")
#
# SMOKE_FLAGS: more Megatron flags for both legs (e.g. "--attention-backend unfused" for megatron-core's own
# attention instead of torch SDPA where Transformer Engine is missing). A 70M model at micro-batch 4 is bound by
# kernel launches (3.5x fewer tokens/s than at 16 on an H200), hence one micro-batch of 16 per step.
#
# Then KD_ITERS iterations of distillation (0: none) with the weights the run saved as both teacher and student:
# the first KD loss is 0 up to kernel differences (checked), and tokens/s with the teacher's forward is printed.
# Stage 1 (prepare, skipped when $WORK/ready exists) needs the embedded model: it prunes it to the demo shape
# (unless $WORK/pruned_hf exists), converts it to Megatron, tokenizes the built-in text and writes the tokenizer,
# config.json and the model's shape flags. With SMOKE_WEIGHTS=0 it keeps no weights (a 142 MB model does not
# travel to a lent GPU machine); stage 2 then starts from random weights of the same shape, which trains at the
# same tokens/s and MFU.
# SMOKE_SHAPE (prune's shape flags, e.g. "--num-layers 16 --hidden-size 2048 --num-attention-heads 32
# --num-query-groups 8 --ffn-hidden-size 8192", the ~1B LLaMA shape) trains that shape instead, from random weights
# (it may be larger than the embedded model: nothing is pruned), with the embedded model's tokenizer and head size.
# PREPARE_ONLY=1 stops after stage 1. For the `device` tool (64 MiB of files travel, no network there):
#   here:  WORK=.gpu_smoke SMOKE_WEIGHTS=0 PREPARE_ONLY=1 bash scripts/gpu_smoke.sh
#          python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#            --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.19.2
#   there: (carry .gpu_smoke and .whl)
#          python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#          PYTHONPATH=/tmp/site:$PWD WORK=.gpu_smoke PYTHON=python3 bash scripts/gpu_smoke.sh
# Transformer Engine is used when installed; else megatron-core's local spec (pretrain_llama.py says which).
# Should torch.compile fail there (it compiles the bias-SwiGLU and bias-dropout fusions on a GPU), the run is
# repeated once without those fusions, and the KD leg goes without them too.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
source "$here/scripts/common.bash"
script_help "$0" "$@"
require_python gpu_smoke.sh
WORK="${WORK:-/tmp/mp-gpu-smoke}"; ITERS="${ITERS:-50}"; SEQ_LEN="${SEQ_LEN:-2048}"
MICRO_BATCH="${MICRO_BATCH:-16}"; GLOBAL_BATCH="${GLOBAL_BATCH:-16}"; KD_ITERS="${KD_ITERS:-10}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"

if [[ ! -f "$WORK/ready" ]]; then
"$PYTHON" - "$WORK" "${SMOKE_WEIGHTS:-1}" "${SMOKE_SHAPE:-}" <<'PY'
import argparse, json, shutil, sys
from pathlib import Path
from megatron.prune.cli import main
from megatron.prune.commands.demo import DEMO_SHAPE
from megatron.prune.core.shape import hf_config_for_shape, shape_from_hf_config
from megatron.prune.formats.hf import HFCheckpoint
from megatron.prune.formats.mcore.ops import hf_to_megatron
from megatron.prune.models import embedded_model_dir
from megatron.prune.text import builtin_text

work, keep_weights, shape_flags = Path(sys.argv[1]), sys.argv[2] != "0", sys.argv[3].split()
pruned = work / "pruned_hf"
if shape_flags:  # a shape of its own: the embedded model's config and tokenizer rewritten for it, no weights
    fields = {"num-layers": "num_layers", "hidden-size": "hidden_size", "num-attention-heads": "num_attention_heads",
              "num-query-groups": "num_query_groups", "ffn-hidden-size": "ffn_hidden_size"}
    ap = argparse.ArgumentParser(prog="SMOKE_SHAPE", allow_abbrev=False)
    for flag in fields:
        ap.add_argument(f"--{flag}", type=int)
    given = {fields[k.replace("_", "-")]: v for k, v in vars(ap.parse_args(shape_flags)).items() if v is not None}
    if any(v < 1 for v in given.values()):
        sys.exit(f"SMOKE_SHAPE: sizes must be positive: {given}")
    embedded = embedded_model_dir()
    config = json.loads((embedded / "config.json").read_text())
    s = shape_from_hf_config(config).replace(**given)
    if s.num_attention_heads % s.num_query_groups:
        sys.exit(f"SMOKE_SHAPE: {s.num_attention_heads} heads do not divide into {s.num_query_groups} groups")
    pruned.mkdir(parents=True, exist_ok=True)
    (pruned / "config.json").write_text(json.dumps(hf_config_for_shape(config, s), indent=2) + "\n")
    for f in embedded.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy2(f, pruned / f.name)
    keep_weights = False
else:
    if not pruned.exists():
        shape = [x for k, v in DEMO_SHAPE.items() for x in (f"--{k}", str(v))]
        assert main(["prune", "--input", str(embedded_model_dir()), "--output", str(pruned), *shape]) == 0
    s = HFCheckpoint.open(pruned).shape
flags = ["--num-layers", s.num_layers, "--hidden-size", s.hidden_size, "--ffn-hidden-size", s.ffn_hidden_size,
         "--num-attention-heads", s.num_attention_heads, "--group-query-attention",
         "--num-query-groups", s.num_query_groups, "--kv-channels", s.head_dim]
if not s.tied_embeddings:
    flags.append("--untie-embeddings-and-output-weights")
(work / "model_flags.txt").write_text(" ".join(map(str, flags)) + "\n")
tokenizer = work / "tokenizer"
tokenizer.mkdir(exist_ok=True)
for f in pruned.iterdir():
    if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) or f.name == "config.json":
        shutil.copy2(f, tokenizer / f.name)
text = work / "text.txt"
text.write_text(builtin_text("calib"))
assert main(["data", "--input", str(text), "--output-prefix", str(work / "text"),
             "--tokenizer", str(tokenizer), "--no-progress"]) == 0
text.unlink()
if keep_weights:  # parameter names of the layer spec stage 2 builds on this machine
    from megatron.prune.training.recipe import have_transformer_engine

    hf_to_megatron(pruned, work / "pruned_mg", tp=1,
                   spec="transformer_engine" if have_transformer_engine() else "local")
else:
    shutil.rmtree(pruned)
(work / "ready").write_text("")
PY
fi
[[ "${PREPARE_ONLY:-0}" == 1 ]] && { echo "prepared $WORK"; exit 0; }

if [[ -d "$WORK/pruned_mg" ]]; then
  model=(env LOAD="$WORK/pruned_mg"); extra=()
else
  echo "no pruned weights in $WORK: random weights of the pruned shape ($(cat "$WORK/model_flags.txt"))"
  model=(env); read -r -a extra < "$WORK/model_flags.txt"
fi
impl=local; "$PYTHON" -c "import transformer_engine" 2>/dev/null && impl=transformer_engine

run=(DATA="$WORK/text_text_document" TOKENIZER="$WORK/tokenizer" TP=1 SEQ_LEN="$SEQ_LEN" MICRO_BATCH="$MICRO_BATCH"
     GLOBAL_BATCH="$GLOBAL_BATCH" LR=1e-4 LOG_INTERVAL=1 PRECISION=bf16 PYTHON="$PYTHON")
read -r -a smoke_flags <<< "${SMOKE_FLAGS:-}"
flags=(--transformer-impl "$impl" --max-position-embeddings "$SEQ_LEN" --seq-length "$SEQ_LEN" --log-throughput
       "${smoke_flags[@]}")
throughput=("$PYTHON" -m megatron.prune.training.throughput --config "$WORK/tokenizer/config.json"
            --seq-len "$SEQ_LEN" --global-batch "$GLOBAL_BATCH")
rm -rf "$WORK/trained"

log="$WORK/train.log"
train() {  # weights only (--no-save-optim): the KD leg reads them with --finetune; at ~1B the optimizer state is 14 GB
  "${model[@]}" "${run[@]}" TRAIN_ITERS="$ITERS" SAVE="$WORK/trained" \
    bash "$here/scripts/check_model.sh" "${extra[@]}" "${flags[@]}" --no-save-optim 2>&1 | tee "$log"
}
if train; then :; else  # the bias-SwiGLU and bias-dropout fusions are torch.compile'd on a GPU (Triton, a C compiler)
  rc=$?
  grep -qE "torch[._/]_(inductor|dynamo)|InductorError|BackendCompilerFailed" "$log" || exit $rc
  cp "$log" "$WORK/train-compile-failed.log"
  echo "torch.compile failed on this machine (log: $WORK/train-compile-failed.log): again without the compiled fusions"
  flags+=(--no-bias-swiglu-fusion --no-bias-dropout-fusion)
  rm -rf "$WORK/trained"
  train
fi
"${throughput[@]}" --log "$log"
echo "layer spec: $impl"

if (( KD_ITERS > 0 )); then
  kd_log="$WORK/kd.log"
  env "${run[@]}" TRAIN_ITERS="$KD_ITERS" LOAD="$WORK/trained" KD_TEACHER="$WORK/trained" KD_ALPHA=1 \
    bash "$here/scripts/check_model.sh" "${flags[@]}" 2>&1 | tee "$kd_log"
  echo "distillation (teacher == student; the FLOP count leaves out the teacher's forward):"
  "${throughput[@]}" --log "$kd_log" --warmup 2 | grep -v "^device"
  first="$(grep -m1 -oE 'kd loss: [0-9.E+-]+' "$kd_log" | cut -d' ' -f3 || true)"
  [[ -n "$first" ]] || { echo "error: no 'kd loss' in $kd_log" >&2; exit 1; }
  "$PYTHON" -c "import sys; v = float(sys.argv[1]); print(f'first KD loss: {v:.3g} (teacher == student)');
sys.exit(0 if v < 1e-3 else 'error: the teacher does not give the student\'s logits')" "${first:-nan}"
fi
