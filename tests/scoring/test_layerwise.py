"""One decoder layer at a time: the same scores and perplexity, one layer materialised at a time."""

from __future__ import annotations

import shutil

import pytest

from compare import TOKENIZER_FILES
from megatron.prune.cli import main
from megatron.prune.errors import PruneError
from megatron.prune.formats.hf import HFCheckpoint
from tiny import make_tiny_model


def test_layer_by_layer_holds_one_decoder_layer_at_a_time(tok_model, monkeypatch, capsys):
    """Scoring layer by layer materialises one decoder layer at a time (the embedding is freed before the first);
    --layer-by-layer auto takes that path only when the whole model would not fit in half the free memory, and
    says so."""
    from megatron.prune.scoring import layerwise
    from megatron.prune.scoring.methods import ScoringOptions, score_model

    seen: dict[str, object] = {"most_layers": 0, "calls": 0}
    skeleton, materialise = layerwise.skeleton, layerwise.materialise

    def keep(config, dtype):
        seen["model"] = skeleton(config, dtype)
        return seen["model"]

    def watch(module, prefix, src, device):
        materialise(module, prefix, src, device)
        body = seen["model"].model
        real = [i for i, layer in enumerate(body.layers) if any(p.device.type != "meta" for p in layer.parameters())]
        if real:
            assert body.embed_tokens.weight.device.type == "meta" and real == [int(prefix.split(".")[-1])], real
        seen["most_layers"], seen["calls"] = max(seen["most_layers"], len(real)), seen["calls"] + 1

    monkeypatch.setattr(layerwise, "skeleton", keep)
    monkeypatch.setattr(layerwise, "materialise", watch)
    need = HFCheckpoint.open(tok_model).shape.num_params() * 4
    for free, layered in ((need * 3, False), (need, True)):
        monkeypatch.setattr(layerwise, "free_bytes", lambda device, free=free: free)
        run = score_model(tok_model, ScoringOptions(samples=4, seq_len=32, progress=False))
        assert run.meta["layer_by_layer"] is layered
        out = capsys.readouterr().out
        assert ("scoring layer by layer: the whole model (" in out and "would take more than 50% of the" in out) \
            is layered
    assert seen["most_layers"] == 1 and seen["calls"] == 1 + 4  # the embedding, then each of the 4 layers
    with pytest.raises(PruneError, match="--layer-by-layer 'sometimes'; choose one of auto, always, never"):
        score_model(tok_model, ScoringOptions(samples=4, seq_len=32, progress=False, layer_by_layer="sometimes"))


def test_layer_by_layer_perplexity_of_a_tied_model(real_model, tmp_path, capsys):
    """Tied embeddings: the layer-by-layer head is the embedding, and the perplexity is the whole model's."""
    folder = tmp_path / "tied"
    make_tiny_model("llama-tied", vocab_size=49152).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (real_model / name).is_file():
            shutil.copy(real_model / name, folder / name)
    ppl = []
    for mode in ("never", "always"):
        assert main(["eval", "--model", str(folder), "--max-tokens", "256", "--seq-len", "64", "--no-progress",
                     "--layer-by-layer", mode]) == 0
        ppl.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert ppl[0] == ppl[1] and ppl[0].startswith("perplexity: "), ppl
    assert main(["eval", "--model", str(folder), "--tasks", "hellaswag", "--layer-by-layer", "always"]) == 2
    assert "--layer-by-layer always: lm-eval tasks need the whole model in memory" in capsys.readouterr().err
