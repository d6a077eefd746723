#!/usr/bin/env bash
# Token frequencies of a corpus and the ids of the most frequent tokens, at the seed project's path:
#   cd emb_pruner/llama_emb_pruner
#   DATA_PATH=corpus.txt SPM=MODEL/tokenizer.model REMAIN_VOCAB_SIZE=15000 bash get_vocab_freq.sh
# Writes vocab_freq.txt ("id count", most frequent first), vocab_freq.json (a `megatron-prune vocab count` file) and
# remain_vocab_ids.pt, which prune_spm_and_emb.sh reads. The kept ids already include the special tokens, the
# byte/unk fallback and the merges a kept token needs.
# Variables: each flag of get_vocab_freq.py, upper-cased: DATA_PATH (required; several files space-separated),
# SPM (required: tokenizer.model, tokenizer.json or the model folder), DATA_TYPE (txt | jsonl; txt),
# REMAIN_VOCAB_SIZE (20000), VOCAB_FREQ (vocab_freq), REMAIN_VOCAB_IDS_PATH (remain_vocab_ids.pt);
# PYTHON (python). Flags given as arguments win.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
PYTHON="${PYTHON:-python}"
source "$root/scripts/common.bash"
script_help "$0" "$@"
need get_vocab_freq.sh DATA_PATH --data_path "the corpus file(s)" "$@"
need get_vocab_freq.sh SPM --spm "the tokenizer (tokenizer.model, tokenizer.json or the model folder)" "$@"
require_python get_vocab_freq.sh
flags=()
[[ -n "${DATA_PATH:-}" ]] && flags+=(--data_path $DATA_PATH)
for var in SPM DATA_TYPE REMAIN_VOCAB_SIZE VOCAB_FREQ REMAIN_VOCAB_IDS_PATH; do
  [[ -n "${!var:-}" ]] && flags+=("--${var,,}" "${!var}")
done
exec "$PYTHON" "$here/get_vocab_freq.py" "${flags[@]}" "$@"
