"""``megatron-prune <verb>``: the one command-line front door.

Each verb lives in its own module under ``megatron.prune.commands`` exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported lazily so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import re
import sys
from typing import Callable, Iterator, Sequence

from megatron.prune.errors import PruneError
from megatron.prune.io.atomic import FINISHED, Terminated, interrupts_remembered, raise_if_interrupted

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


def set_library_bars(on: bool) -> None:
    """Turn the hub's progress bars (which transformers' follow when imported later) and, where it is imported,
    transformers' own on or off. Quietly: the hub warns when ``HF_HUB_DISABLE_PROGRESS_BARS`` overrides the call."""
    import warnings

    from huggingface_hub import utils as hub_utils

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        (hub_utils.enable_progress_bars if on else hub_utils.disable_progress_bars)()
    on = on and not hub_utils.are_progress_bars_disabled()  # the user's HF_HUB_DISABLE_PROGRESS_BARS=1 stands
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()


@contextlib.contextmanager
def library_bars_off() -> Iterator[None]:
    """``--no-progress`` silences the libraries' bars too (transformers' "Loading weights", the hub's) for the run,
    through their switches in this process (transformers, imported during the run, reads the hub's), and turns them
    back on afterwards: a process that runs several verbs keeps its bars. Not through ``HF_HUB_DISABLE_PROGRESS_BARS``:
    the hub reads it once, on import, so an import during the run kept the bars off for the process and warned on
    every later switch."""
    set_library_bars(False)
    try:
        yield
    finally:
        set_library_bars(True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb; a refusal, a filesystem fault or Ctrl-C ends with one line on stderr, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = argv[0] if argv and argv[0] in VERBS else None
    name = f"megatron-prune {verb}" if verb else "megatron-prune"
    FINISHED.clear()
    with interrupts_remembered():
        try:
            args = parse(argv, verb)
        except PruneError as e:
            print(f"{name}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # during start-up imports
            print(f"{name}: {interrupted_line()}", file=sys.stderr)
            return 130
        return execute(args, name)


def parse(argv: list[str], verb: str | None) -> argparse.Namespace:
    """``argv`` parsed by the requested verb's parser alone (importing every verb pulls in torch)."""
    quiet_optional_backends()
    parser = build_parser([verb] if verb else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would report them under the top-level usage, not the verb's
        verb_parser(parser, args.verb).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def execute(args: argparse.Namespace, prog: str, reword: Callable[[str], str] = str) -> int:
    """Run a parsed verb; a refusal (exit status 2), a filesystem fault (1) or Ctrl-C (130) ends with one line
    ``PROG: ...`` on stderr, never a traceback. ``reword`` lets a seed entry point name its own flags in that line.
    Callers wrap parsing and this in :func:`.io.atomic.interrupts_remembered`."""
    FINISHED.clear()
    quiet = library_bars_off() if getattr(args, "no_progress", False) else contextlib.nullcontext()
    try:
        raise_if_interrupted()  # a Ctrl-C during the imports that a library swallowed
        with quiet:
            return int(args._run(args) or 0)
    except PruneError as e:
        print(f"{prog}: error: {reword(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, read-only filesystem, a file gone mid-run: every output is written atomically
        print(f"{prog}: error: {reword(os_error_line(e, args))}; stopped, nothing half-written is left",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted_line()}", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"{prog}: {interrupted_line('terminated (SIGTERM)')}", file=sys.stderr)
        return int(e.code)


def os_error_line(e: OSError, args: argparse.Namespace | None = None) -> str:
    """An OSError in one line: a full or read-only disk by the output it stopped, anything else by its file (an
    output's temporary sibling by the output's name)."""
    output = next((getattr(args, k) for k in ("output", "output_prefix") if getattr(args, k, None)), None)
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) and output is not None:
        fix = "make it writable" if e.errno == errno.EROFS else "free some space there"
        return f"{e.strerror} while writing {output}: {fix}, or write elsewhere"
    where = re.sub(r"\.([^/]+)\.partial-[^/]+", r"\1", str(e.filename)) if e.filename else ""
    return f"{e.strerror or e}" + (f": {where}" if where else "")


def interrupted_line(what: str = "interrupted") -> str:
    """What a Ctrl-C (or SIGTERM) left: nothing (outputs are written to temporary siblings and renamed at the end),
    or, when it came after the last rename, a complete output."""
    if FINISHED:
        return f"{what} after {FINISHED[-1]} was written in full; it is complete"
    return f"{what}; nothing half-written is left"


if __name__ == "__main__":
    sys.exit(main())
