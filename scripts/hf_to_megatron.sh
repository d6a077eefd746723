#!/usr/bin/env bash
# Convert an HF LLaMA-family checkpoint to a Megatron-LM torch checkpoint.
#   HF=llama-hf MG=llama-mg TP=2 PP=1 bash scripts/hf_to_megatron.sh [extra convert flags]
# Variables (default): HF (required), MG (required), TP (1), PP (1),
# IMPL (layer spec to write: transformer_engine where Transformer Engine imports, else local; train with the same),
# DIVISIBLE_BY (128: vocab padding unit before the TP factor).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
: "${HF:?set HF to the HF checkpoint folder}"
: "${MG:?set MG to the output folder}"
if [[ -z "${IMPL:-}" ]]; then
  IMPL=local; "$PYTHON" -c "import transformer_engine" 2>/dev/null && IMPL=transformer_engine
fi
exec "$PYTHON" "$here/tools/checkpoint_conversion/hf_to_megatron.py" --input "$HF" --output "$MG" \
  --tp "${TP:-1}" --pp "${PP:-1}" --transformer-impl "$IMPL" \
  --make-vocab-size-divisible-by "${DIVISIBLE_BY:-128}" "$@"
