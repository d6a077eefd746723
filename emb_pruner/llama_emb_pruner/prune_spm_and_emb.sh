#!/usr/bin/env bash
# Prune an HF model's vocabulary (tokenizer + embedding / lm_head rows) to the ids get_vocab_freq.sh chose, at the
# seed project's path; `bash prune_spm_and_emb.py` (as the seed's README writes it) runs this script too:
#   cd emb_pruner/llama_emb_pruner
#   HF_DIR=MODEL SAVE_DIR=MODEL_SMALL_VOCAB bash prune_spm_and_emb.sh
# The same as `megatron-prune vocab prune --input MODEL --output MODEL_SMALL_VOCAB --keep-ids remain_vocab_ids.pt`.
# Variables: each flag of prune_spm_and_emb.py, upper-cased: HF_DIR (required), SAVE_DIR (a new folder; unset:
# HF_DIR is replaced in place, as the seed did on its copy), REMAIN_VOCAB_PATH (remain_vocab_ids.pt),
# REMAIN_IDS_WITH_SPT (where to write the final ids, special tokens included; unset: not written); PYTHON (python).
# Flags given as arguments win.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
PYTHON="${PYTHON:-python}"
source "$root/scripts/common.bash"
script_help "$0" "$@"
need prune_spm_and_emb.sh HF_DIR --hf_dir "the HF model folder" "$@"
require_python prune_spm_and_emb.sh
flags=()
for var in HF_DIR SAVE_DIR REMAIN_VOCAB_PATH REMAIN_IDS_WITH_SPT; do
  [[ -n "${!var:-}" ]] && flags+=("--${var,,}" "${!var}")
done
exec "$PYTHON" "$here/prune_spm_and_emb.py" "${flags[@]}" "$@"
