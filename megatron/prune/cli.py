"""``megatron-prune <verb>``: the one command-line front door.

Each verb lives in its own module under ``megatron.prune.commands`` exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported lazily so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

from megatron.prune.errors import PruneError

# verb -> module; the module's docstring is the verb's long help.
VERBS: dict[str, str] = {
    "prune": "megatron.prune.commands.prune",
    "eval": "megatron.prune.commands.evaluate",
    "demo": "megatron.prune.commands.demo",
    "data": "megatron.prune.commands.data",
    "vocab": "megatron.prune.commands.vocab",
    "score": "megatron.prune.commands.score",
    "convert": "megatron.prune.commands.convert",
    "reshard": "megatron.prune.commands.reshard",
    "plan": "megatron.prune.commands.plan",
}


def build_parser(verbs: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-prune",
        description="Prune LLaMA-family models (HF or Megatron checkpoints) to any smaller shape, "
        "then recover them by continued pre-training on Megatron.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="<verb>", required=True)
    for verb in verbs or VERBS:
        mod = importlib.import_module(VERBS[verb])
        p = sub.add_parser(
            verb,
            help=mod.HELP,
            description=mod.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def verb_parser(parser: argparse.ArgumentParser, verb: str) -> argparse.ArgumentParser:
    """The sub-parser of ``verb`` (its usage is the one to show for that verb's mistakes)."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[verb]


def quiet_optional_backends() -> None:
    """File-to-file verbs need neither CUDA nor Transformer Engine/Apex; the notices megatron-core and torch print on
    import when those are missing (a reading of a trained checkpoint's pickled args imports megatron-core) are
    noise here. Training (pretrain_llama.py) keeps them."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r"(Transformer Engine and Apex are|Apex is) not installed",
                            category=UserWarning)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_optional_backends()
    # Build only the requested verb's parser: importing every verb pulls in torch/megatron.
    verb = argv[0] if argv and argv[0] in VERBS else None
    parser = build_parser([verb] if verb else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would report them under the top-level usage, not the verb's
        verb_parser(parser, args.verb).error(f"unrecognized arguments: {' '.join(unknown)}")
    return execute(args, f"megatron-prune {args.verb}")


def execute(args: argparse.Namespace, prog: str, reword: Callable[[str], str] = str) -> int:
    """Run a parsed verb; bad input becomes one line ``PROG: error: ...`` (exit status 2), never a traceback.
    ``reword`` lets a seed entry point name its own flags in that line."""
    try:
        return int(args._run(args) or 0)
    except PruneError as e:
        print(f"{prog}: error: {reword(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are written to temp folders and renamed at the end: nothing half-done
        print(f"{prog}: interrupted; nothing half-written is left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
