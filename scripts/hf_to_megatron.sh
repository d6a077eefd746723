#!/usr/bin/env bash
# Convert an HF LLaMA-family checkpoint to a Megatron-LM torch checkpoint.
#   HF=llama-hf MG=llama-mg TP=2 PP=1 bash scripts/hf_to_megatron.sh [extra convert flags]
# Variables (default): HF (required), MG (required), TP (1), PP (1), IMPL (local | transformer_engine),
# DIVISIBLE_BY (128: vocab padding unit before the TP factor).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
: "${HF:?set HF to the HF checkpoint folder}"
: "${MG:?set MG to the output folder}"
exec "$PYTHON" "$here/tools/checkpoint_conversion/hf_to_megatron.py" --input "$HF" --output "$MG" \
  --tp "${TP:-1}" --pp "${PP:-1}" --transformer-impl "${IMPL:-local}" \
  --make-vocab-size-divisible-by "${DIVISIBLE_BY:-128}" "$@"
