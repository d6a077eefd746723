#!/usr/bin/env bash
# Convert a Megatron-LM checkpoint (its latest iteration; TP/PP shards gathered, vocabulary padding removed) to an
# HF safetensors folder, at the seed project's path: `megatron-prune convert megatron-to-hf`.
#   MG=llama-mg HF=llama-hf bash tools/checkpoint_conversion/megatron_to_hf.sh [--iteration N]
# or with the seed's flags: --load_path llama-mg --save_path llama-hf.
# Variables: MG, HF (required, or the flags); PYTHON (python).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python}"
source "$here/scripts/common.bash"
script_help "$0" "$@"
need megatron_to_hf.sh MG "--input|--load_path" "the Megatron checkpoint folder" "$@"
need megatron_to_hf.sh HF "--output|--save_path" "the output folder" "$@"
require_python megatron_to_hf.sh
flags=()
[[ -n "${MG:-}" ]] && flags+=(--input "$MG")
[[ -n "${HF:-}" ]] && flags+=(--output "$HF")
exec "$PYTHON" "$here/tools/checkpoint_conversion/megatron_to_hf.py" "${flags[@]}" "$@"
