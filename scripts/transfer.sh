#!/usr/bin/env bash
# Reshard a Megatron checkpoint to another TP/PP size (weights unchanged): `megatron-prune reshard`.
# Only the model is carried over: the optimizer and RNG state are dropped and the iteration is reset to 0 (train
# the result with --finetune; scripts/check_model.sh does so when LOAD != SAVE).
#   LOAD=mg_tp2 SAVE=mg_tp1 TP=1 PP=1 bash scripts/transfer.sh [extra reshard flags]
# Variables: LOAD, SAVE (required, or --input / --output); TP and PP (default: keep the input's); PYTHON (python).
# A flag given as an argument wins over its variable (--input over LOAD, --tp over TP, ...), with a note.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
source "$here/scripts/common.bash"
script_help "$0" "$@"
flag_wins transfer.sh LOAD "--input|--load-dir" "$@"
flag_wins transfer.sh SAVE "--output|--save-dir" "$@"
flag_wins transfer.sh TP "--tp|--target-tensor-parallel-size" "$@"
flag_wins transfer.sh PP "--pp|--target-pipeline-parallel-size" "$@"
for var in TP PP; do [[ -z "${!var:-}" ]] || whole_numbers transfer.sh "$var"; done
need transfer.sh LOAD "--input|--load-dir" "the Megatron checkpoint folder" "$@"
need transfer.sh SAVE "--output|--save-dir" "the output folder" "$@"
require_python transfer.sh
flags=()
[[ -n "${LOAD:-}" ]] && flags+=(--input "$LOAD")
[[ -n "${SAVE:-}" ]] && flags+=(--output "$SAVE")
[[ -n "${TP:-}" ]] && flags+=(--tp "$TP")
[[ -n "${PP:-}" ]] && flags+=(--pp "$PP")
exec "$PYTHON" "$here/tools/checkpoint_conversion/reshard.py" "${flags[@]}" "$@"
