"""torch_dist checkpoints: written by megatron-core's saver, read layer by layer, round trips bit-exact."""

from __future__ import annotations

import pytest
import torch

from compare import assert_same_tensors, hf_tensors
from megatron.prune.cli import main as cli_main
from megatron.prune.errors import PruneError
from megatron.prune.formats.folder import open_megatron
from megatron.prune.formats.mcore import ops


@pytest.mark.parametrize("family", ["qwen2-bias", "qwen3"])
def test_torch_dist_output_round_trips_and_reshards(tiny_hf, tmp_path, monkeypatch, family):
    """hf -> torch_dist (TP=2, PP=2, megatron-core's saver) -> hf is bit-exact, reading each stored element once
    (layer by layer, not the whole stacked tensor per layer); CLI reshard of it to torch TP=1 is bit-exact too.
    (megatron-core's own loader at TP=2 is checked in test_megatron_parity.py.)"""
    import math

    import torch.distributed.checkpoint as dcp

    from megatron.prune.formats.mcore.dist import TorchDistCheckpoint

    hf = tiny_hf(family)
    out = ops.hf_to_megatron(hf, tmp_path / "dist", tp=2, pp=2, progress=False, ckpt_format="torch_dist")
    ck = open_megatron(out)
    assert isinstance(ck, TorchDistCheckpoint) and (ck.tp, ck.pp) == (2, 2)
    assert ck.args.ckpt_format == "torch_dist" and not list(ck.iter_dir.glob("mp_rank_*"))
    stored = sum(math.prod(md.size) for md in ck.metadata.state_dict_metadata.values() if hasattr(md, "size"))
    read = []
    load = dcp.load
    monkeypatch.setattr(dcp, "load", lambda sd, *a, **k: (read.extend(t.numel() for t in sd.values()
                                                                       if isinstance(t, torch.Tensor)),
                                                           load(sd, *a, **k))[1])
    assert_same_tensors(hf_tensors(hf), hf_tensors(ops.megatron_to_hf(out, tmp_path / "back", progress=False)))
    assert sum(read) == stored, (sum(read), stored)
    monkeypatch.setattr(dcp, "load", load)
    assert cli_main(["reshard", "--input", str(out), "--output", str(tmp_path / "tp1"), "--tp", "1", "--pp", "1",
                     "--no-progress"]) == 0
    assert open_megatron(tmp_path / "tp1").tp == 1
    assert_same_tensors(hf_tensors(hf), hf_tensors(ops.megatron_to_hf(tmp_path / "tp1", tmp_path / "b1",
                                                                     progress=False)))


def test_refuses_unknown_ckpt_format(tp2, tmp_path):
    with pytest.raises(PruneError, match="'zarr'.*torch, torch_dist"):
        ops.reshard(tp2, tmp_path / "y", ckpt_format="zarr", progress=False)
    assert not (tmp_path / "y").exists()
