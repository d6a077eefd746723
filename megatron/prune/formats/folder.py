"""The front door for model folders: what a folder holds (an HF checkpoint or a Megatron one), its tensors, its
tokenizer. Callers ask :func:`open_model` instead of testing for marker files themselves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron.prune.errors import PruneError
from megatron.prune.formats.mcore.schema import META_DIR, TRACKER
from megatron.prune.formats.source import TensorSource

KINDS = ("hf", "megatron")


def model_kind(path: Path | str) -> str | None:
    """``megatron`` (a ``latest_checkpointed_iteration.txt``), ``hf`` (a ``config.json``) or None."""
    path = Path(path)
    if is_megatron_dir(path):
        return "megatron"
    if (path / "config.json").is_file():
        return "hf"
    return None


def is_megatron_dir(path: Path | str) -> bool:
    """A Megatron-LM checkpoint folder (its tracker file names the latest iteration)."""
    return (Path(path) / TRACKER).is_file()


def has_tokenizer(folder: Path) -> bool:
    """``folder`` holds a tokenizer transformers can load (fast ``tokenizer.json`` or a tokenizer config)."""
    return any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))


def has_tokenizer_file(folder: Path) -> bool:
    """``folder`` holds a vocabulary file Megatron's tokenizers read (``tokenizer.json`` or SentencePiece's
    ``tokenizer.model``): a converted checkpoint's args then name it. Not :func:`has_tokenizer`: a tokenizer config
    alone does not make a Megatron tokenizer."""
    return any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))


@dataclass(frozen=True)
class ModelFolder:
    """A model checkpoint folder of a known kind."""

    path: Path
    kind: str  # one of KINDS

    @property
    def tokenizer_dir(self) -> Path:
        """Where the model's tokenizer lives: the HF folder itself, or a Megatron checkpoint's ``hf_meta/``."""
        return self.path / META_DIR if self.kind == "megatron" else self.path

    def has_tokenizer(self) -> bool:
        """Calibration or evaluation text can be tokenized for this model."""
        return has_tokenizer(self.tokenizer_dir)

    def open(self, iteration: int | None = None) -> TensorSource:
        """The folder's tensors (checked, read lazily)."""
        if self.kind == "megatron":
            return open_megatron(self.path, iteration)
        from megatron.prune.formats.hf import HFCheckpoint

        return HFCheckpoint.open(self.path)


def open_model(path: Path | str) -> ModelFolder:
    """The model folder at ``path``, or a PruneError saying why it is none."""
    path = Path(path)
    if not path.exists():
        raise PruneError(f"input {path} does not exist")
    if not path.is_dir():
        raise PruneError(f"input {path} is not a folder")
    kind = model_kind(path)
    if kind is None:
        raise PruneError(f"input {path} is not a checkpoint folder of a known format ({', '.join(KINDS)}): "
                         "expected config.json (HF) or latest_checkpointed_iteration.txt (Megatron)")
    return ModelFolder(path, kind)


def as_model_folder(path: Path | str) -> ModelFolder:
    """``path`` taken as a model folder without checks: Megatron where its tracker file is, else HF (whose opening
    then says what is missing)."""
    return ModelFolder(Path(path), model_kind(path) or "hf")


def open_megatron(folder: Path | str, iteration: int | None = None):
    """A Megatron checkpoint's ``iteration`` (default: the latest), torch or torch_dist, as a TensorSource."""
    from megatron.prune.formats.mcore.dist import TorchDistCheckpoint, is_torch_dist
    from megatron.prune.formats.mcore.read import MegatronCheckpoint, find_iteration_dir

    folder = Path(folder)
    if not folder.is_dir():
        raise PruneError(f"input {folder} is not a folder")
    iter_dir = find_iteration_dir(folder, iteration)
    if is_torch_dist(iter_dir):
        return TorchDistCheckpoint.open(folder, iter_dir)
    return MegatronCheckpoint.open(folder, iter_dir)
