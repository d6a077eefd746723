#!/usr/bin/env bash
# Reshard a Megatron checkpoint to another TP/PP size (weights unchanged).
#   LOAD=mg_tp2 SAVE=mg_tp1 TP=1 PP=1 bash scripts/transfer.sh [extra reshard flags]
# Variables: LOAD (required), SAVE (required), TP and PP (default: keep the input's).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
: "${LOAD:?set LOAD to the Megatron checkpoint folder}"
: "${SAVE:?set SAVE to the output folder}"
extra=()
[[ -n "${TP:-}" ]] && extra+=(--tp "$TP")
[[ -n "${PP:-}" ]] && extra+=(--pp "$PP")
exec "$PYTHON" "$here/tools/checkpoint_conversion/reshard.py" --input "$LOAD" --output "$SAVE" "${extra[@]}" "$@"
