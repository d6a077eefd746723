"""Target resolution: the GQA rule and targets the source cannot reach, refused before anything is written."""

from __future__ import annotations

import pytest

from compare import prune_cli, shape_of, tree_hash
from megatron.prune.cli import main
from megatron.prune.core import target
from megatron.prune.core.plan import PrunePlan
from megatron.prune.errors import PruneError
from tiny import make_tiny_model


CASES = {
    "larger than source": (["--ffn-hidden-size", "100"], "--ffn-hidden-size 100", "1..64"),
    "heads not multiple of groups": (["--num-query-groups", "4", "--num-attention-heads", "6"],
                                     "not a multiple of the 4", "[4, 8]"),
    "drop-groups needs whole groups": (["--num-attention-heads", "5"], "multiple of 2", "--gqa trim-heads"),
    "too many heads per group": (["--num-query-groups", "2", "--num-attention-heads", "6"], "heads per group",
                                 "multiples of 2 up to 4"),
    "balance not divisible by tp": (["--tp", "2", "--ffn-hidden-size", "33"], "not divisible by --tp 2", "[32, 34]"),
    "drop layer out of range": (["--drop-layers", "1,9"], "--drop-layers 9", "0..3"),
    "drop layer repeated": (["--drop-layers", "1,1"], "repeats layer(s) 1", ""),
    "drop every layer": (["--drop-layers", "0,1,2,3"], "all 4 layers", ""),
    "hf hidden not multiple of heads": (["--hidden-size", "44"], "--hidden-size 44", "[40, 48]"),
    "zero layers": (["--num-layers", "0"], "--num-layers 0", "1..4"),
}


def test_gqa_modes():
    model = make_tiny_model("llama-tied")  # 6 heads, 2 KV groups, 3 heads per group
    shape = shape_of(model)
    assert target.gqa_query_groups(shape, 4, None, "trim-heads") == 2
    assert target.gqa_query_groups(shape, 3, None, "drop-groups") == 1
    assert target.gqa_query_groups(shape, 3, 2, "drop-groups") == 2  # explicit wins
    with pytest.raises(PruneError, match="multiple of 3"):
        target.gqa_query_groups(shape, 4, None, "drop-groups")


def test_gqa_default_drops_whole_groups(tiny_hf, tmp_path):
    """--num-attention-heads alone drops whole KV groups (measured better); --gqa trim-heads keeps every group."""
    src = tiny_hf("llama-gqa")  # 8 heads in 4 groups
    assert prune_cli(src, tmp_path / "drop", "--num-attention-heads", "4", "--hidden-size", "40") == 0
    assert prune_cli(src, tmp_path / "trim", "--num-attention-heads", "4", "--hidden-size", "40",
                     "--gqa", "trim-heads") == 0
    drop, trim = PrunePlan.load(tmp_path / "drop").target, PrunePlan.load(tmp_path / "trim").target
    assert (drop.num_query_groups, drop.heads_per_group) == (2, 2)
    assert (trim.num_query_groups, trim.heads_per_group) == (4, 1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_target_refused(tiny_hf, tmp_path, capsys, case):
    flags, must_say, valid = CASES[case]
    src = tiny_hf("llama-gqa")
    before = tree_hash(src)
    rc = main(["prune", "--input", str(src), "--output", str(tmp_path / "out"), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert rc == 2
    assert must_say in err and valid in err, err
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary leftovers either
    assert tree_hash(src) == before
