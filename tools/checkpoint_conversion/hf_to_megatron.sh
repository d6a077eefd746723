#!/usr/bin/env bash
# Convert an HF LLaMA-family checkpoint to a Megatron-LM checkpoint, at the seed project's path; the same as
# scripts/hf_to_megatron.sh and `megatron-prune convert hf-to-megatron`.
#   HF=llama-hf MG=llama-mg TP=2 PP=1 bash tools/checkpoint_conversion/hf_to_megatron.sh
# or with the seed's flags:
#   bash tools/checkpoint_conversion/hf_to_megatron.sh --load_path llama-hf --save_path llama-mg \
#     --target_tensor_model_parallel_size 2 --target_pipeline_model_parallel_size 1
# Variables (default): HF, MG (required, or the flags); TP (1), PP (1); IMPL (auto: the layer spec training builds
# on this machine); DIVISIBLE_BY (128); PYTHON (python).
# Seed flags with no meaning here (--target_data_parallel_size, --target_params_dtype, --megatron-path,
# --print-checkpoint-structure) are ignored with a note: the weights keep the checkpoint's dtype.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python}"
source "$here/scripts/common.bash"
script_help "$0" "$@"
exec bash "$here/scripts/hf_to_megatron.sh" "$@"
