#!/usr/bin/env bash
# Convert an HF LLaMA-family checkpoint to a Megatron-LM checkpoint: `megatron-prune convert hf-to-megatron`.
#   HF=llama-hf MG=llama-mg TP=2 PP=1 bash scripts/hf_to_megatron.sh [extra convert flags]
# Variables (default): HF, MG (required, or --input / --output); TP (1), PP (1);
# IMPL (auto: the layer spec pretrain_llama.py builds on this machine: transformer_engine where Transformer Engine
# and a GPU are present, else local); DIVISIBLE_BY (128: vocab padding unit before the TP factor); PYTHON (python).
# A flag given as an argument wins over its variable (--input over HF, --tp over TP, ...), with a note.
# The same as `bash tools/checkpoint_conversion/hf_to_megatron.sh` (the seed's path).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
source "$here/scripts/common.bash"
script_help "$0" "$@"
flag_wins hf_to_megatron.sh HF "--input|--load_path" "$@"
flag_wins hf_to_megatron.sh MG "--output|--save_path" "$@"
flag_wins hf_to_megatron.sh TP "--tp|--target_tensor_model_parallel_size" "$@"
flag_wins hf_to_megatron.sh PP "--pp|--target_pipeline_model_parallel_size" "$@"
flag_wins hf_to_megatron.sh DIVISIBLE_BY "--make-vocab-size-divisible-by|--make_vocab_size_divisible_by" "$@"
for var in TP PP DIVISIBLE_BY; do [[ -z "${!var:-}" ]] || whole_numbers hf_to_megatron.sh "$var"; done
need hf_to_megatron.sh HF "--input|--load_path" "the HF checkpoint folder" "$@"
need hf_to_megatron.sh MG "--output|--save_path" "the output folder" "$@"
require_python hf_to_megatron.sh
# only the variables that are set: convert fills in the defaults, and a seed flag (--target_*) may give the value
flags=(--transformer-impl "${IMPL:-auto}")
[[ -n "${TP:-}" ]] && flags+=(--tp "$TP")
[[ -n "${PP:-}" ]] && flags+=(--pp "$PP")
[[ -n "${DIVISIBLE_BY:-}" ]] && flags+=(--make-vocab-size-divisible-by "$DIVISIBLE_BY")
[[ -n "${HF:-}" ]] && flags+=(--input "$HF")
[[ -n "${MG:-}" ]] && flags+=(--output "$MG")
exec "$PYTHON" "$here/tools/checkpoint_conversion/hf_to_megatron.py" "${flags[@]}" "$@"
