"""Running a model folder as a stock transformers model (for scoring and evaluation): compute dtypes, the model and
tokenizer of an HF checkpoint, or of a Megatron checkpoint built into the same HF model in memory."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tqdm import tqdm

from megatron.prune.core.shape import hf_config_for_shape
from megatron.prune.errors import PruneError
from megatron.prune.formats.folder import as_model_folder, has_tokenizer, open_megatron
from megatron.prune.formats.mcore.schema import META_DIR
from megatron.prune.formats.source import TensorSource, check_finite

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_hf(folder: Path | str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Stock ``AutoModelForCausalLM`` / ``AutoTokenizer`` from a local folder (no hub access): an HF checkpoint,
    or a Megatron checkpoint built into the same HF model in memory (see :func:`megatron_as_hf`)."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if as_model_folder(folder).kind == "megatron":
        return megatron_as_hf(folder, dtype, device)
    check_model_folder(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True).to(device).eval()
    for name, p in model.named_parameters():  # a Megatron checkpoint's tensors are checked as they are read
        check_finite(p.detach(), f"{folder}: {name}")
    return model, load_tokenizer(folder)


DEVICE_CHOICES = "auto (cuda where a GPU is available, else cpu), cpu, cuda or cuda:N"


def resolve_device(device: str) -> str:
    """``--device`` as torch takes it: ``auto`` is cuda where a GPU is available, else cpu; an unknown device, or
    CUDA where there is none, is refused here, once, before any work."""
    name = device.strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m is None:
        raise PruneError(f"--device {device}: unknown device; choose {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise PruneError(f"--device {device}: no CUDA device is available here; use --device cpu (or auto)")
    count = torch.cuda.device_count()
    if m.group(1) is not None and int(m.group(1)) >= count:
        raise PruneError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return name


def model_seq_len(folder: Path | str, seq_len: int | None, default: int) -> int:
    """``--seq-len`` checked against the model's positions (``max_position_embeddings``): refused beyond them (past
    its trained length a model's perplexity is not the one it was trained for); not given, ``default`` or the
    model's length where that is shorter."""
    limit = as_model_folder(folder).open().hf_config.get("max_position_embeddings")
    if not isinstance(limit, int) or limit < 2:
        return default if seq_len is None else seq_len
    if seq_len is None:
        return min(default, limit)
    if seq_len > limit:
        raise PruneError(f"--seq-len {seq_len}: longer than the model's max_position_embeddings {limit}; use "
                         f"--seq-len {limit} or less")
    return seq_len


def check_model_folder(folder: Path) -> None:
    """``folder`` holds a model to run: HF config and weights, or a Megatron checkpoint with an hf_meta/ tokenizer."""
    if as_model_folder(folder).kind == "megatron":
        check_megatron_tokenizer(folder)
        return
    if not (folder / "config.json").is_file():
        raise PruneError(f"{folder} is not an HF model folder (no config.json) nor a Megatron checkpoint (no "
                         f"latest_checkpointed_iteration.txt)")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        raise PruneError(f"{folder}: no weights (*.safetensors or pytorch_model*.bin) beside its config.json")


def load_tokenizer(folder: Path | str):
    """The tokenizer of a model folder: its own (HF), or the one in a Megatron checkpoint's ``hf_meta/``."""
    from transformers import AutoTokenizer

    model = as_model_folder(folder)
    if not model.has_tokenizer():  # transformers would try every backend and fail in a traceback
        raise PruneError(f"{folder} has no tokenizer ({'its hf_meta/ holds none' if model.kind == 'megatron' else
                         'no tokenizer.json or tokenizer_config.json beside config.json'}): text cannot go "
                         "through it; copy the tokenizer files of the model it came from into the folder")
    return AutoTokenizer.from_pretrained(model.tokenizer_dir, local_files_only=True)


def megatron_as_hf(folder: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The HF model of a Megatron checkpoint (latest iteration; torch or torch_dist; any TP/PP), built in memory
    tensor by tensor, with the tokenizer of its ``hf_meta/``: score and evaluate it without exporting it first.

    Same config, weights and class as ``convert megatron-to-hf`` would write, so the logits are the same.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from megatron.prune.formats.hf import memory_tensor, parse_hf_name
    from megatron.prune.formats.mcore.schema import PARAM_OF_ROLE, PARAMS

    src = open_megatron(folder)
    check_megatron_tokenizer(folder)
    config = megatron_hf_config(src)
    with no_init_weights(), torch.device(device):  # parameters are overwritten below: skip the random init
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = dict(model.named_parameters())  # tied embeddings appear once, as the embedding
    stored = [p.key for p in PARAMS]

    def read_order(name: str) -> tuple[int, int, str]:  # stored tensor, then layer: each is read (unfused) once
        try:
            role, layer = parse_hf_name(name)
        except KeyError:  # a MoE layer's router and fused experts: after the rest
            return len(stored), 0, name
        return stored.index(PARAM_OF_ROLE[role].key), layer or 0, role

    order = sorted(params, key=read_order)
    with torch.no_grad():
        for name in tqdm(order, desc="loading tensors", unit="tensor", disable=len(order) < 64):
            params[name].copy_(memory_tensor(src, name))
    src.release()
    return model.eval(), load_tokenizer(folder)


def check_megatron_tokenizer(folder: Path) -> None:
    """A Megatron checkpoint runs as an HF model only with the tokenizer our conversion keeps in ``hf_meta/``."""
    if not has_tokenizer(folder / META_DIR):
        raise PruneError(f"{folder} has no tokenizer in {META_DIR}/ (a checkpoint converted elsewhere): export it "
                         f"with `megatron-prune convert megatron-to-hf --input {folder} --output {folder}-hf` and "
                         f"copy the model's tokenizer files into {folder}-hf")


def megatron_hf_config(src: TensorSource):
    """The transformers config of the HF model a Megatron checkpoint converts to (refused where transformers
    cannot build that shape)."""
    from transformers import AutoConfig

    from megatron.prune.formats.hf import check_hf_target

    check_hf_target(src.shape, src.hf_config)
    cfg = hf_config_for_shape(src.hf_config, src.shape)
    return AutoConfig.for_model(cfg.pop("model_type", "llama"), **cfg)


def transformers_config(src: TensorSource):
    """The transformers config of the HF model a checkpoint is (an HF folder's own; a Megatron checkpoint's built
    from its hf_meta/ or args), without loading any tensor."""
    from transformers import AutoConfig

    if as_model_folder(src.folder).kind == "megatron":
        return megatron_hf_config(src)
    return AutoConfig.from_pretrained(src.folder, local_files_only=True)


def tokenize(tok, text: str, max_tokens: int | None, vocab_size: int | None = None) -> torch.Tensor:
    """``text`` as token ids ``[n]`` (the first ``max_tokens``); with ``vocab_size``, the model's embedding rows, an id
    beyond them is refused here rather than as an IndexError deep in the embedding: the tokenizer is not the model's."""
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    ids = ids[:max_tokens] if max_tokens else ids
    if vocab_size is not None and ids.numel() and int(ids.max()) >= vocab_size:
        raise PruneError(f"the tokenizer gives token id {int(ids.max())} but the model's vocabulary has {vocab_size} "
                         f"entries (ids 0 to {vocab_size - 1}): the tokenizer files beside the weights are not this "
                         "model's (a vocabulary-pruned model needs the tokenizer `vocab prune` wrote)")
    return ids
