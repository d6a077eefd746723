"""The training data of a recovery run: megatron-core ``GPTDataset`` blends built from Megatron's data flags, as the
stock GPT script builds them."""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Sequence

from megatron.prune.errors import PruneError


def read_sequence_counts(path: str | None) -> dict[str, int] | None:
    """--per-dataset-sequences-path: {dataset path: sequence count}, which spares reading each index; None without
    the flag."""
    if path is None:
        return None
    try:
        with open(path) as f:
            counts = json.load(f)
    except OSError as e:
        raise PruneError(f"--per-dataset-sequences-path {path}: {e.strerror}") from None
    except ValueError as e:
        raise PruneError(f"--per-dataset-sequences-path {path}: not JSON ({e})") from None
    if not isinstance(counts, dict):
        raise PruneError(f"--per-dataset-sequences-path {path}: must hold a JSON object (dataset path -> sequence "
                         f"count), not {type(counts).__name__}")
    return counts


def dataset_tuning(args: Any) -> dict[str, Any]:
    """``GPTDatasetConfig`` fields from Megatron's dataset flags (validation sets, blend sizing, pad-token masking,
    index loading), as the stock GPT script passes them."""
    return dict(
        multiple_validation_sets=getattr(args, "multiple_validation_sets", None),
        full_validation=getattr(args, "full_validation", None),
        num_dataset_builder_threads=getattr(args, "num_dataset_builder_threads", 1),
        object_storage_cache_path=getattr(args, "object_storage_cache_path", None),
        mid_level_dataset_surplus=getattr(args, "mid_level_dataset_surplus", 0.005),
        allow_ambiguous_pad_tokens=getattr(args, "allow_ambiguous_pad_tokens", False),
        fast_cache_load=getattr(args, "dataloader_fast_cache_load", False),
        sequences_per_dataset=read_sequence_counts(getattr(args, "per_dataset_sequences_path", None)),
        defer_npy_index_mmap=getattr(args, "dataloader_defer_npy_index_mmap", False),
    )


def train_valid_test_datasets_provider(train_val_test_num_samples: Sequence[int]):
    """GPTDataset splits (blends and per-split paths as in Megatron's --data-path flags)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.training import get_args, get_tokenizer
    from megatron.training.utils.common_utils import get_blend_and_blend_per_split

    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        # plain causal masking happens inside attention; per-document masks only where asked for
        # (check_document_masking)
        create_attention_mask=bool(args.reset_attention_mask),
        mmap_bin_files=args.mmap_bin_files,
        **dataset_tuning(args),
    )
    cls = MockGPTDataset if getattr(args, "mock_data", False) else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, train_val_test_num_samples, lambda: True, config).build()


# Every rank reads its own batches (TP ranks of one DP rank read the same ones): no broadcast.
train_valid_test_datasets_provider.is_distributed = True  # type: ignore[attr-defined]


def check_dataset_files(prefix: str) -> None:
    """Refuse a dataset whose ``.idx`` or ``.bin`` is cut short (a copy that stopped, a full disk), before start-up:
    megatron-core maps both and fails on each rank, mid-run, at the first sample past the end."""
    from megatron.prune.data import token_dtype

    idx, bin_path = f"{prefix}.idx", f"{prefix}.bin"
    itemsize = token_dtype(prefix).itemsize  # refuses a file that is no index at all
    head = 9 + 8 + 1  # magic, version, dtype code; then sequence and document counts
    with open(idx, "rb") as f:
        f.seek(head)
        counts = f.read(16)
        n, docs = struct.unpack("<QQ", counts) if len(counts) == 16 else (0, 0)
        need = head + 16 + 12 * n + 8 * docs  # int32 lengths, int64 pointers, int64 document starts
        if len(counts) < 16 or os.path.getsize(idx) < need:
            raise PruneError(f"data prefix {prefix}: {idx} is truncated ({os.path.getsize(idx)} bytes, its header "
                             f"promises {need}); tokenize the data again (megatron-prune data)")
        if n == 0:
            return
        f.seek(head + 16 + 4 * (n - 1))
        (last_len,) = struct.unpack("<i", f.read(4))
        f.seek(head + 16 + 4 * n + 8 * (n - 1))
        (last_start,) = struct.unpack("<q", f.read(8))
    need = last_start + last_len * itemsize
    if os.path.getsize(bin_path) < need:
        raise PruneError(f"data prefix {prefix}: {bin_path} is truncated ({os.path.getsize(bin_path)} bytes, its "
                         f"index needs {need}); tokenize the data again (megatron-prune data)")
