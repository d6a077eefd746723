"""The checkpoint tools at the seed's paths (``tools/checkpoint_conversion/``): ``hf_to_megatron.py``,
``megatron_to_hf.py`` and ``reshard.py``, each one direction of ``megatron-prune convert`` / ``reshard`` with its own
``--help``. Besides this project's flags they take the seed's (its ``llama_checkpoint_conversion.py``'s, and the
``tools/checkpoint/util.py`` flags of its ``transfer.sh``); seed flags with no meaning here are ignored with a note."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Callable

from megatron.prune.seed.verbs import OneLineParser, seed_words


@dataclass(frozen=True)
class Tool:
    """One checkpoint tool: the verb it runs, the seed's names for the verb's flags, the seed flags it ignores."""

    prog: str
    verb: str  # the verb module's name in megatron.prune.commands
    direction: str | None  # convert's direction, fixed for the tool
    usage: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    aliases: dict[str, str] = field(default_factory=dict)  # seed flag -> verb flag
    ignored: dict[str, tuple[bool, str]] = field(default_factory=dict)  # seed flag -> (takes a value, why)


SEED_IGNORED = {
    "--target_data_parallel_size": (True, "data parallelism is not stored in a checkpoint"),
    "--target_params_dtype": (True, "the weights keep the source's dtype; pretrain_llama.py's --bf16 casts them"),
    "--print-checkpoint-structure": (False, "the output folder lists it"),
    "--megatron-path": (True, "megatron-core is an installed package here"),
    "--convert_checkpoint_from_megatron_to_transformers": (False, "the direction is this script's"),
}


def tool_parser(tool: Tool) -> tuple[argparse.ArgumentParser, list[argparse.Action]]:
    """The tool's parser, and the required flags it lets come under their seed names (checked after parsing)."""
    p = OneLineParser(prog=tool.prog, description=tool.usage, allow_abbrev=False,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    tool.add_arguments(p)
    lifted = [a for a in p._actions if a.required and any(f in a.option_strings for f in tool.aliases.values())]
    for action in lifted:
        action.required = False
    seed = p.add_argument_group("the seed project's flags (same meaning as the flag named)")
    for alias, flag in tool.aliases.items():
        action = next(a for a in p._actions if flag in a.option_strings)
        seed.add_argument(alias, dest=f"seed:{alias}", type=action.type, metavar=action.metavar or "X",
                          help=f"= {flag}")
    for alias, (takes_value, _) in tool.ignored.items():
        kind = dict(metavar="X") if takes_value else dict(action="store_const", const=True)
        seed.add_argument(alias, dest=f"seed:{alias}", help="ignored (no meaning here)", **kind)
    return p, lifted


def parse_tool_args(tool: Tool, argv: list[str]) -> tuple[argparse.Namespace, dict[str, str], list[str]]:
    """(verb namespace, verb flag -> the seed flag used for it, ignored seed flags as typed)."""
    p, lifted = tool_parser(tool)
    a = p.parse_args(argv)
    names: dict[str, str] = {}
    for alias, flag in tool.aliases.items():
        value = getattr(a, f"seed:{alias}")
        if value is None:
            continue
        dest = flag.lstrip("-").replace("-", "_")
        default = p.get_default(dest)
        if getattr(a, dest) not in (None, default, value):
            p.error(f"{alias} {value} and {flag} {getattr(a, dest)}: give one")
        setattr(a, dest, value)
        names[flag] = alias
    for action in lifted:
        if getattr(a, action.dest) is None:
            seed = [alias for alias, flag in tool.aliases.items() if flag in action.option_strings]
            p.error(f"the following arguments are required: {action.option_strings[0]} (or {', '.join(seed)})")
    ignored = []
    for alias, (takes_value, why) in tool.ignored.items():
        value = getattr(a, f"seed:{alias}")
        if value is not None:
            ignored.append(f"{alias}{f' {value}' if takes_value else ''} ({why})")
    for name in [n for n in vars(a) if n.startswith("seed:")]:
        delattr(a, name)
    return a, names, ignored


def run_tool(tool: Tool, argv: list[str] | None) -> int:
    """Parse ``argv`` as ``tool`` and run its verb, bad input as one line ``PROG: error: ...`` (exit status 2)."""
    import importlib

    from megatron.prune.cli import execute, quiet_optional_backends

    quiet_optional_backends()
    a, names, ignored = parse_tool_args(tool, sys.argv[1:] if argv is None else argv)
    if ignored:
        print(f"{tool.prog}: note: ignored {', '.join(ignored)}", flush=True)
    module = importlib.import_module(f"megatron.prune.commands.{tool.verb}")
    if tool.direction is not None:
        a.direction = tool.direction
    a._run = module.run
    return execute(a, tool.prog, lambda message: seed_words(message, names))


def _convert_tool(direction: str) -> Callable[[argparse.ArgumentParser], None]:
    from megatron.prune.commands import convert

    def add(p: argparse.ArgumentParser) -> None:
        convert.add_io_arguments(p)
        (convert.add_hf_to_megatron_arguments if direction == "hf-to-megatron"
         else convert.add_megatron_to_hf_arguments)(p)

    return add


def _reshard_arguments(p: argparse.ArgumentParser) -> None:
    from megatron.prune.commands import reshard

    reshard.add_arguments(p)


HF_TO_MEGATRON = Tool(
    prog="hf_to_megatron.py", verb="convert", direction="hf-to-megatron",
    usage="""HF safetensors -> Megatron-LM checkpoint: `megatron-prune convert hf-to-megatron` (same output).

    python tools/checkpoint_conversion/hf_to_megatron.py --input HF --output MG --tp 2 --pp 1
    python tools/checkpoint_conversion/hf_to_megatron.py --load_path HF --save_path MG \\
        --target_tensor_model_parallel_size 2 --target_pipeline_model_parallel_size 1   (the seed's flags)
""",
    add_arguments=_convert_tool("hf-to-megatron"),
    aliases={"--load_path": "--input", "--save_path": "--output", "--target_tensor_model_parallel_size": "--tp",
             "--target_pipeline_model_parallel_size": "--pp",
             "--make_vocab_size_divisible_by": "--make-vocab-size-divisible-by"},
    ignored={k: v for k, v in SEED_IGNORED.items() if k != "--convert_checkpoint_from_megatron_to_transformers"},
)

MEGATRON_TO_HF = Tool(
    prog="megatron_to_hf.py", verb="convert", direction="megatron-to-hf",
    usage="""Megatron-LM checkpoint -> HF safetensors: `megatron-prune convert megatron-to-hf` (same output).

    python tools/checkpoint_conversion/megatron_to_hf.py --input MG --output HF
    python tools/checkpoint_conversion/megatron_to_hf.py --load_path MG --save_path HF   (the seed's flags)
""",
    add_arguments=_convert_tool("megatron-to-hf"),
    aliases={"--load_path": "--input", "--save_path": "--output"},
    ignored=SEED_IGNORED,
)

RESHARD = Tool(
    prog="reshard.py", verb="reshard", direction=None,
    usage="""Change a Megatron checkpoint's TP/PP size: `megatron-prune reshard` (same output). The optimizer and
RNG state are dropped and the iteration is reset to 0 (load the result with --finetune).

    python tools/checkpoint_conversion/reshard.py --input MG --output MG_TP1 --tp 1
    python tools/checkpoint_conversion/reshard.py --load-dir MG --save-dir MG_TP1 \\
        --target-tensor-parallel-size 1 --target-pipeline-parallel-size 1   (Megatron's tools/checkpoint flags)
""",
    add_arguments=_reshard_arguments,
    aliases={"--load-dir": "--input", "--save-dir": "--output", "--target-tensor-parallel-size": "--tp",
             "--target-pipeline-parallel-size": "--pp"},
    ignored={"--model-type": (True, "LLaMA-family GPT models only"), "--loader": (True, "the format is detected"),
             "--saver": (True, "--ckpt-format chooses"), "--megatron-path": SEED_IGNORED["--megatron-path"]},
)


def hf_to_megatron(argv: list[str] | None = None) -> int:
    """``tools/checkpoint_conversion/hf_to_megatron.py``."""
    return run_tool(HF_TO_MEGATRON, argv)


def megatron_to_hf(argv: list[str] | None = None) -> int:
    """``tools/checkpoint_conversion/megatron_to_hf.py``."""
    return run_tool(MEGATRON_TO_HF, argv)


def reshard(argv: list[str] | None = None) -> int:
    """``tools/checkpoint_conversion/reshard.py``."""
    return run_tool(RESHARD, argv)
