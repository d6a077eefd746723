"""Megatron-LM checkpoints of megatron-core's ``GPTModel`` (LLaMA family), split by concern: :mod:`.schema` (names,
fusions, split axes, stored shapes, padding), :mod:`.args` (the saved ``args``), :mod:`.read` (torch format),
:mod:`.dist` (torch_dist, read and written), :mod:`.write` (torch-format shards) and :mod:`.ops` (convert, reshard,
prune)."""
