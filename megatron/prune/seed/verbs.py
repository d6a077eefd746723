"""Running a ``megatron-prune`` verb for a seed entry point: the verb's own parser and code, its errors headed by
the seed script's name and worded with the seed flags the user typed (``--ffn_hidden_size_remain``, not the verb's
``--ffn-hidden-size``)."""

from __future__ import annotations

import argparse
import re
from typing import Mapping, NoReturn, Sequence


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are one line ``PROG: error: ...`` (exit 2), no usage: that is --help's."""

    def error(self, message: str) -> NoReturn:
        """Exit 2 with the error line alone, no usage before it."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def seed_words(message: str, names: Mapping[str, str]) -> str:
    """``message`` with each verb flag of ``names`` (``--tp``) replaced by the seed's name for it; whole flags
    only (``--tp`` is not the start of ``--tp-size``)."""
    if not names:
        return message
    pattern = re.compile("|".join(rf"(?<![\w-]){re.escape(new)}(?![\w-])" for new in sorted(names, key=len,
                                                                                            reverse=True)))
    return pattern.sub(lambda m: names[m.group(0)], message)


def run_verb(prog: str, argv: Sequence[str], names: Mapping[str, str]) -> int:
    """``megatron-prune ARGV`` run as the seed script ``prog``: exit status 2 and one line ``PROG: error: ...``
    (in the seed's words, ``names``: verb flag -> seed flag) for bad input, as the verb itself would."""
    import contextlib
    import io
    import sys

    from megatron.prune.cli import execute, interrupted_line, parse

    said = io.StringIO()  # the verb's usage names the verb's flags, not the seed's: only its error line is shown
    try:
        with contextlib.redirect_stderr(said):
            args = parse(list(argv), argv[0])
    except KeyboardInterrupt:  # during start-up imports
        print(f"{prog}: {interrupted_line()}", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse refused a value the seed flags or config carried (a type it cannot take)
        errors = [line.split(" error: ", 1)[1] for line in said.getvalue().splitlines() if " error: " in line]
        print(f"{prog}: error: {seed_words(errors[-1], names) if errors else said.getvalue().strip()}",
              file=sys.stderr)
        return int(e.code or 0) if isinstance(e.code, int) else 2
    sys.stderr.write(said.getvalue())
    return execute(args, prog, lambda message: seed_words(message, names))


def int_list(text: str) -> list[int]:
    """``--drop_layers 3,7`` or ``--drop_layers 3 7`` (each value): the layer numbers, or a usage error."""
    try:
        return [int(x) for x in text.replace(" ", ",").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer numbers like 3,7 or 3 7, got {text!r}") from None
