"""The seed project's entry points ("Pruning LLMs to any config"), in one place. Each translates the seed's flags
into the ``megatron-prune`` verb that does the work, so both write the same output, and words the verb's errors with
the flags the user typed. The files at the seed's paths (``prune_llama.py``, ``prune_hf/``, ``emb_pruner/``,
``tools/checkpoint_conversion/``) only call :func:`main`.

  prune.py           prune_llama.py (Megatron or HF checkpoint), prune_hf/prune_llama.py (HF + a JSON config)
  megatron_flags.py  the seed scripts' Megatron flags (GPT_ARGS) given to prune_llama.py: checked or noted
  vocab.py           emb_pruner/: get_vocab_freq.py, prune_spm_and_emb.py
  convert.py         tools/checkpoint_conversion/: hf_to_megatron.py, megatron_to_hf.py, reshard.py
  verbs.py           running a verb under a seed script's name and flags
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Sequence

# entry point -> (its script, module, function)
ENTRY_POINTS: dict[str, tuple[str, str, str]] = {
    "prune_llama": ("prune_llama.py", "megatron.prune.seed.prune", "prune_llama"),
    "prune_hf": ("prune_hf/prune_llama.py", "megatron.prune.seed.prune", "prune_hf"),
    "get_vocab_freq": ("get_vocab_freq.py", "megatron.prune.seed.vocab", "get_vocab_freq"),
    "prune_spm_and_emb": ("prune_spm_and_emb.py", "megatron.prune.seed.vocab", "prune_spm_and_emb"),
    "hf_to_megatron": ("hf_to_megatron.py", "megatron.prune.seed.convert", "hf_to_megatron"),
    "megatron_to_hf": ("megatron_to_hf.py", "megatron.prune.seed.convert", "megatron_to_hf"),
    "reshard": ("reshard.py", "megatron.prune.seed.convert", "reshard"),
}


def missing_packages(names: Sequence[str] = ("torch", "megatron.core")) -> list[str]:
    """The packages of ``names`` this Python cannot import (looked up, not imported: fast)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            missing.append(name)
    return missing


def no_environment_message(prog: str, missing: Sequence[str]) -> str:
    """One line for a Python without this project's packages (a venv not activated), instead of a traceback."""
    return (f"{prog}: error: {sys.executable} cannot import {', '.join(missing)}: run `make install` and "
            "`source .venv/bin/activate` (or use the Python that has megatron-prune installed)")


def main(name: str, argv: Sequence[str] | None = None) -> int:
    """Run the entry point ``name`` (a key of :data:`ENTRY_POINTS`) on ``argv`` (default: the command line)."""
    script, module, function = ENTRY_POINTS[name]
    missing = missing_packages()
    if missing:
        print(no_environment_message(script, missing), file=sys.stderr)
        return 1
    from megatron.prune.cli import interrupted_line
    from megatron.prune.io.atomic import interrupts_remembered

    with interrupts_remembered():
        try:
            return getattr(importlib.import_module(module), function)(None if argv is None else list(argv))
        except KeyboardInterrupt:  # during the imports (the verb's own run answers for itself)
            print(f"{script}: {interrupted_line()}", file=sys.stderr)
            return 130
