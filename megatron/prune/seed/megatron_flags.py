"""The Megatron flags the seed's prune script passed along (its GPT_ARGS, DATA_ARGS, OUTPUT_ARGS: the seed pruned
inside a Megatron launch). Here pruning reads the model's shape and layout from the checkpoint, so the flags that
describe the checkpoint are checked against it (a mismatch is an error naming both values) and the training ones are
ignored with a one-line note. A flag that Megatron does not know either stays an error."""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from megatron.prune.core.shape import ModelShape
from megatron.prune.errors import PruneError
from megatron.prune.seed.verbs import OneLineParser


@dataclass(frozen=True)
class MegatronFlags:
    """Megatron flags found among a seed command's arguments, and what neither parser knows."""

    given: dict[str, Any]  # option string (as Megatron spells it) -> value
    unknown: list[str]


def megatron_flag_parser(prog: str) -> argparse.ArgumentParser:
    """Megatron-LM's own flag parser (megatron-core's), every default suppressed so that only given flags appear."""
    from megatron.prune.cli import quiet_optional_backends

    quiet_optional_backends()
    warnings.filterwarnings("ignore", message="Only transformer-engine", category=UserWarning)  # TE not installed
    from megatron.training.arguments import add_megatron_arguments

    parser = OneLineParser(prog=prog, add_help=False, allow_abbrev=False)
    add_megatron_arguments(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return parser


def parse_megatron_flags(tokens: Sequence[str], prog: str) -> MegatronFlags:
    """Split ``tokens`` into Megatron flags (parsed by Megatron's parser: its value counts and types) and the rest.
    Loading that parser imports megatron.training (seconds), so it is only done when there are such tokens."""
    if not tokens:
        return MegatronFlags({}, [])
    parser = megatron_flag_parser(prog)
    ns, unknown = parser.parse_known_args(list(tokens))
    spelling = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    return MegatronFlags({spelling[dest]: value for dest, value in vars(ns).items()}, unknown)


def checkpoint_values(shape: ModelShape, tp: int | None, pp: int | None) -> dict[str, Any]:
    """What each Megatron flag describing the model must say for this checkpoint (TP/PP only for a Megatron one)."""
    values: dict[str, Any] = {
        "--num-layers": shape.num_layers, "--hidden-size": shape.hidden_size,
        "--num-attention-heads": shape.num_attention_heads, "--num-query-groups": shape.num_query_groups,
        "--ffn-hidden-size": shape.ffn_hidden_size, "--kv-channels": shape.head_dim,
        "--untie-embeddings-and-output-weights": not shape.tied_embeddings,
    }
    if tp is not None:
        values["--tensor-model-parallel-size"] = tp
    if pp is not None:
        values["--pipeline-model-parallel-size"] = pp
    return values


def spelled(flag: str, value: Any) -> str:
    """A flag as typed: ``--num-layers 32``, or the bare switch for a true boolean."""
    return flag if value is True else f"{flag} {value}"


def check_megatron_flags(given: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> list[str]:
    """Raise PruneError where a given flag contradicts the checkpoint ``where``; return the flags it ignores."""
    wrong = [f"{spelled(flag, value)} (the checkpoint has {expected[flag]})" for flag, value in given.items()
             if flag in expected and value != expected[flag]]
    if wrong:
        raise PruneError(f"Megatron flags disagree with the checkpoint {where}: {'; '.join(wrong)}; pruning reads the "
                         "model's shape and layout from the checkpoint, so drop these flags or correct them")
    return [flag for flag in given if flag not in expected]


def ignored_note(prog: str, ignored: Sequence[str]) -> str | None:
    """The one line that says which Megatron training flags were passed over."""
    if not ignored:
        return None
    return (f"{prog}: note: Megatron training flags ignored (pruning is file-to-file and reads the model's shape "
            f"from the checkpoint): {' '.join(ignored)}")
