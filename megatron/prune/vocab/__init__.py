"""Vocabulary pruning: count token frequencies, choose kept ids that leave every text encodable,
rewrite SentencePiece and BPE tokenizers, and slice the embedding / output rows of the model."""

from .counts import TokenCounts, count_tokens
from .folder import TokenizerFolder, make_encoder, open_tokenizer, write_pruned_tokenizer
from .apply import (choose_kept, prune_hf_vocab, prune_megatron_vocab, prune_tokenizer, read_keep_ids,
                    vocab_plan)
from .rules import VocabRules, closure, minimum_keep, select_top

__all__ = [
    "TokenCounts", "TokenizerFolder", "VocabRules", "choose_kept", "closure", "count_tokens", "make_encoder",
    "minimum_keep", "open_tokenizer", "prune_hf_vocab", "prune_megatron_vocab", "prune_tokenizer", "read_keep_ids",
    "select_top", "vocab_plan", "write_pruned_tokenizer",
]
