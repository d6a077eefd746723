#!/usr/bin/env bash
# Recovery training (continued pre-training, optionally distillation) of a pruned LLaMA-family model
# on the stock Megatron loop, via pretrain_llama.py. Settings come from environment variables;
# every argument is passed on as an extra Megatron flag (later flags win).
#
#   LOAD=pruned_mg SAVE=out DATA=data/corpus_text_document TOKENIZER=pruned_hf TRAIN_ITERS=10 \
#     bash scripts/check_model.sh [--extra-megatron-flags ...]
#
# Variables (default):
#   LOAD          Megatron checkpoint to start from (none: random init; then pass shape flags).
#                 Its model shape is used (--use-checkpoint-args). LOAD != SAVE: --finetune
#                 (iteration 0, fresh optimizer); LOAD == SAVE: resume where it stopped (a checkpoint
#                 never trained, as converted or pruned, starts as with --finetune). To resume with
#                 another TRAIN_ITERS or LR schedule, add --override-opt_param-scheduler.
#   SAVE          where checkpoints go (none: no saving)
#   DATA          dataset prefix from `megatron-prune data` (PREFIX_text_document), or a blend
#                 "W1 P1 W2 P2" (required unless --mock-data is passed)
#   TOKENIZER     HF tokenizer folder (e.g. $LOAD/hf_meta) or SentencePiece .model (required); used even
#                 where LOAD's args name another (Megatron's default under --use-checkpoint-args would
#                 take that path, which is gone once the checkpoint has moved)
#   TP (1) PP (1) EP (1) NPROC (TP*PP*EP) NNODES (1)  NODE_RANK (0) MASTER_ADDR (127.0.0.1) MASTER_PORT (29500)
#                 EP: expert-parallel size of a mixture-of-experts model (a torch-format LOAD must have been saved
#                 at it: megatron-prune reshard --ep EP)
#   TRAIN_ITERS (100) SEQ_LEN (512) MICRO_BATCH (1) GLOBAL_BATCH (8) LR (1e-4), MIN_LR (LR/10)
#   TRAIN_SAMPLES (unset) a sample-based schedule instead of TRAIN_ITERS (Megatron's --train-samples;
#                 WARMUP stays in iterations, converted to samples)
#   WARMUP (0) SAVE_INTERVAL (the run's iterations) EVAL_INTERVAL (same) EVAL_ITERS (0) SPLIT (100,0,0;
#                 EVAL_ITERS > 0 needs a validation share, e.g. 98,2,0) LOG_INTERVAL (1) SEED (1234)
#   CKPT_FORMAT   torch or torch_dist (default: LOAD's format, torch without LOAD)
#   KD_TEACHER    Megatron checkpoint of the unpruned teacher (same vocab; torch format: same TP/PP): distillation;
#                 KD_ALPHA (0.5) KD_TEMPERATURE (1.0)
#   PRECISION     bf16 on GPU, fp32 on CPU ("fp32" to force full precision)
# Without a GPU it runs on CPU (gloo + megatron.prune.cpu shims), e.g. on a laptop.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
source "$here/scripts/common.bash"
script_help "$0" "$@"
require_python check_model.sh

mock=0; for arg in "$@"; do [[ "$arg" == --mock-data ]] && mock=1; done
[[ "$mock" == 1 ]] || : "${DATA:?set DATA to a dataset prefix (see megatron-prune data)}"
: "${TOKENIZER:?set TOKENIZER to an HF tokenizer folder or a SentencePiece .model}"
TP="${TP:-1}"; PP="${PP:-1}"; EP="${EP:-1}"; NNODES="${NNODES:-1}"
TRAIN_ITERS="${TRAIN_ITERS:-100}"; SEQ_LEN="${SEQ_LEN:-512}"
MICRO_BATCH="${MICRO_BATCH:-1}"; GLOBAL_BATCH="${GLOBAL_BATCH:-8}"
whole_numbers check_model.sh TP PP EP NNODES TRAIN_ITERS SEQ_LEN MICRO_BATCH GLOBAL_BATCH
NPROC="${NPROC:-$((TP * PP * EP))}"
whole_numbers check_model.sh NPROC
[[ -z "${TRAIN_SAMPLES:-}" ]] || whole_numbers check_model.sh TRAIN_SAMPLES
LR="${LR:-1e-4}"  # MIN_LR defaults to LR / 10; both numbers (read as data, never run as code)
MIN_LR="$("$PYTHON" -c 'import math, sys
def number(name, text):
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not (math.isfinite(v) and v >= 0):
        sys.exit(f"check_model.sh: error: {name}={text}: expected a number >= 0 (a learning rate)")
    return v
lr = number("LR", sys.argv[1])
print(number("MIN_LR", sys.argv[2]) if sys.argv[2] else lr / 10)' "$LR" "${MIN_LR:-}")" || exit 2

if [[ "$TOKENIZER" == *.model ]]; then tok_type=SentencePieceTokenizer; else tok_type=HuggingFaceTokenizer; fi
read -r has_gpu load_format < <("$PYTHON" -c 'import sys, torch
from megatron.prune.training.checkpoints import checkpoint_format
print(int(torch.cuda.is_available()), checkpoint_format(sys.argv[1]) if sys.argv[1] else "none")' "${LOAD:-}")
[[ "$load_format" == torch_dist ]] && CKPT_FORMAT="${CKPT_FORMAT:-torch_dist}"
if [[ -n "${TRAIN_SAMPLES:-}" ]]; then
  iters=$(( (TRAIN_SAMPLES + GLOBAL_BATCH - 1) / GLOBAL_BATCH ))
  schedule=(--train-samples "$TRAIN_SAMPLES" --lr-warmup-samples "$(( ${WARMUP:-0} * GLOBAL_BATCH ))")
else
  iters="$TRAIN_ITERS"
  schedule=(--train-iters "$TRAIN_ITERS" --lr-warmup-iters "${WARMUP:-0}")
fi
data=(--split "${SPLIT:-100,0,0}")
[[ "$mock" == 1 ]] || data+=(--data-path $DATA)

flags=(
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --tokenizer-type "$tok_type" --tokenizer-model "$TOKENIZER" "${data[@]}"
  --seq-length "$SEQ_LEN" --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
  "${schedule[@]}" --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine
  --clip-grad 1.0 --seed "${SEED:-1234}"
  --log-interval "${LOG_INTERVAL:-1}" --eval-interval "${EVAL_INTERVAL:-$iters}"
  --eval-iters "${EVAL_ITERS:-0}" --ckpt-format "${CKPT_FORMAT:-torch}"
  --attention-dropout 0.0 --hidden-dropout 0.0
)
if [[ -n "${LOAD:-}" ]]; then
  flags+=(--load "$LOAD" --use-checkpoint-args --no-use-tokenizer-model-from-checkpoint-args)
  [[ "$LOAD" != "${SAVE:-}" ]] && flags+=(--finetune)
else
  # random init: LLaMA architecture; pass the shape (--num-layers, --hidden-size, ...) as arguments
  flags+=(--normalization RMSNorm --swiglu --disable-bias-linear --position-embedding-type rope
          --max-position-embeddings "$SEQ_LEN")
fi
[[ "$EP" != 1 ]] && flags+=(--expert-model-parallel-size "$EP")
[[ -n "${SAVE:-}" ]] && flags+=(--save "$SAVE" --save-interval "${SAVE_INTERVAL:-$iters}")
[[ -n "${KD_TEACHER:-}" ]] && flags+=(--kd-teacher-load "$KD_TEACHER" --kd-alpha "${KD_ALPHA:-0.5}"
                                      --kd-temperature "${KD_TEMPERATURE:-1.0}")
if [[ "$has_gpu" == 1 && "${PRECISION:-bf16}" == bf16 ]]; then flags+=(--bf16); fi

export CUDA_DEVICE_MAX_CONNECTIONS=1
# Every check a rank makes before start-up, made once here, before torchrun (which would wrap a refusal of each rank
# in its own traceback): a refusal is one line. The ranks then skip the slow part (reading every shard).
preflight_log="$(mktemp)"
set +e
MEGATRON_PRUNE_PREFLIGHT=only RANK=0 LOCAL_RANK=0 WORLD_SIZE=$((NPROC * NNODES)) PYTHONWARNINGS=ignore \
  "$PYTHON" "$here/pretrain_llama.py" "${flags[@]}" "$@" >/dev/null 2>"$preflight_log"
rc=$?
set -e
if [[ "$rc" != 0 ]]; then
  grep -E "^pretrain_llama.py: error:" "$preflight_log" >&2 || tail -n 20 "$preflight_log" >&2
  rm -f "$preflight_log"
  exit "$rc"
fi
rm -f "$preflight_log"
export MEGATRON_PRUNE_PREFLIGHT=done
exec "$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" --nnodes "$NNODES" \
  --node-rank "${NODE_RANK:-0}" --master-addr "${MASTER_ADDR:-127.0.0.1}" \
  --master-port "${MASTER_PORT:-29500}" "$here/pretrain_llama.py" "${flags[@]}" "$@"
