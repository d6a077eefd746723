#!/usr/bin/env bash
# Prune a (TP-sharded) Megatron or an HF LLaMA-family checkpoint with the seed project's flags; no GPU needed.
# The same output as `megatron-prune prune`, bit for bit. Flags as in the seed:
#   bash scripts/prune_llama.sh --load llama7b_tp2 --save llama3b_tp2 --hidden_size_remain 3072 \
#     --num_attention_heads_remain 24 --ffn_hidden_size_remain 8192 --drop_layers 7,13,18,24 --prune_type balance
# or the same from variables (a flag given as an argument wins, with a note):
#   LOAD=llama7b_tp2 SAVE=llama3b_tp2 HIDDEN=3072 HEADS=24 KV_GROUPS=8 FFN=8192 DROP="7 13 18 24" \
#     bash scripts/prune_llama.sh
# Variables: LOAD, SAVE (one way or the other: required); HIDDEN, HEADS, KV_GROUPS, FFN, DROP (omit to keep an
# axis); PRUNE_TYPE (balance | unbalance; default balance); METHOD (auto | activation | magnitude | random;
# default auto: activation where the checkpoint has a tokenizer, else random); RECONSTRUCT (least-squares | none;
# default least-squares with activation selection: the kept weights refit on the calibration text, as
# `megatron-prune prune` does); PYTHON (python).
# The seed's Megatron flags may follow (its GPT_ARGS: --tensor-model-parallel-size 2 --num-layers 32 ...): those
# describing the model are checked against the checkpoint, the training ones are ignored with a note.
# `python prune_llama.py --help` lists every flag.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
source "$here/scripts/common.bash"
script_help "$0" "$@"
for pair in LOAD=--load SAVE=--save PRUNE_TYPE=--prune_type METHOD=--method RECONSTRUCT=--reconstruct \
            HIDDEN=--hidden_size_remain HEADS=--num_attention_heads_remain KV_GROUPS=--num_query_groups_remain \
            FFN=--ffn_hidden_size_remain DROP=--drop_layers; do
  flag_wins prune_llama.sh "${pair%%=*}" "${pair#*=}" "$@"
done
need prune_llama.sh LOAD --load "the checkpoint to prune" "$@"
need prune_llama.sh SAVE --save "the output folder" "$@"
require_python prune_llama.sh
flags=()
[[ -n "${LOAD:-}" ]] && flags+=(--load "$LOAD")
[[ -n "${SAVE:-}" ]] && flags+=(--save "$SAVE")
[[ -n "${PRUNE_TYPE:-}" ]] && flags+=(--prune_type "$PRUNE_TYPE")
[[ -n "${METHOD:-}" ]] && flags+=(--method "$METHOD")
[[ -n "${RECONSTRUCT:-}" ]] && flags+=(--reconstruct "$RECONSTRUCT")
[[ -n "${HIDDEN:-}" ]] && flags+=(--hidden_size_remain "$HIDDEN")
[[ -n "${HEADS:-}" ]] && flags+=(--num_attention_heads_remain "$HEADS")
[[ -n "${KV_GROUPS:-}" ]] && flags+=(--num_query_groups_remain "$KV_GROUPS")
[[ -n "${FFN:-}" ]] && flags+=(--ffn_hidden_size_remain "$FFN")
[[ -n "${DROP:-}" ]] && flags+=(--drop_layers $DROP)
exec "$PYTHON" "$here/prune_llama.py" "${flags[@]}" "$@"
