"""The recovery run's datasets: a dataset cut short is refused by file before start-up."""

from __future__ import annotations

import os

import numpy as np
import pytest

from megatron.prune.errors import PruneError
from megatron.prune.training.datasets import check_dataset_files
from tests.tiny_corpus import write_ids


@pytest.fixture
def dataset(tmp_path) -> str:
    rng = np.random.default_rng(0)
    return write_ids(tmp_path / "d", [rng.integers(0, 1000, size=n) for n in (50, 7, 300)], np.int32)


def test_an_intact_dataset_passes(dataset):
    check_dataset_files(dataset)


def test_a_bin_one_token_short_is_refused(dataset):
    size = os.path.getsize(f"{dataset}.bin")
    os.truncate(f"{dataset}.bin", size - 4)
    with pytest.raises(PruneError, match=rf"d\.bin is truncated \({size - 4} bytes, its index needs {size}\)"):
        check_dataset_files(dataset)


@pytest.mark.parametrize("keep", [20, 40])  # inside the counts, inside the per-sequence arrays
def test_a_cut_index_is_refused(dataset, keep):
    os.truncate(f"{dataset}.idx", keep)
    with pytest.raises(PruneError, match=rf"d\.idx is truncated \({keep} bytes, its header promises"):
        check_dataset_files(dataset)


def test_a_file_that_is_no_index_is_refused(dataset):
    with open(f"{dataset}.idx", "r+b") as f:
        f.write(b"NOTANIDX")
    with pytest.raises(PruneError, match="is not a Megatron indexed-dataset index"):
        check_dataset_files(dataset)
