#!/usr/bin/env bash
# Prune a TP-sharded Megatron LLaMA checkpoint (seed-compatible flags; no GPU needed).
#   LOAD=llama7b_tp2 SAVE=llama3b_tp2 HIDDEN=3072 HEADS=24 KV_GROUPS=8 FFN=8192 DROP="10 14 18 22" \
#     bash scripts/prune_llama.sh [extra prune_llama.py flags]
# Variables: LOAD, SAVE (required); HIDDEN, HEADS, KV_GROUPS, FFN, DROP (omit to keep an axis);
# PRUNE_TYPE (balance | unbalance, default balance).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
: "${LOAD:?set LOAD to the checkpoint to prune}"
: "${SAVE:?set SAVE to the output folder}"
flags=(--load "$LOAD" --save "$SAVE" --prune_type "${PRUNE_TYPE:-balance}")
[[ -n "${HIDDEN:-}" ]] && flags+=(--hidden_size_remain "$HIDDEN")
[[ -n "${HEADS:-}" ]] && flags+=(--num_attention_heads_remain "$HEADS")
[[ -n "${KV_GROUPS:-}" ]] && flags+=(--num_query_groups_remain "$KV_GROUPS")
[[ -n "${FFN:-}" ]] && flags+=(--ffn_hidden_size_remain "$FFN")
[[ -n "${DROP:-}" ]] && flags+=(--drop_layers $DROP)
exec "$PYTHON" "$here/prune_llama.py" "${flags[@]}" "$@"
