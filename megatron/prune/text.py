"""Real English text that ships with Python (``pydoc_data.topics``), split into calibration and held-out parts."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from megatron.prune.errors import PruneError

SPLITS = ("calib", "eval")


@lru_cache(maxsize=None)
def builtin_text(split: str = "eval") -> str:
    """Topics sorted by name; every 4th one is held out for evaluation, the rest calibrate.

    The split is deterministic so calibration never sees the text perplexity is measured on.
    """
    from pydoc_data.topics import topics

    if split not in SPLITS:
        raise PruneError(f"unknown text split {split!r}; choose one of {SPLITS}")
    names = sorted(topics)
    chosen = [n for i, n in enumerate(names) if (i % 4 == 3) == (split == "eval")]
    return "\n\n".join(topics[n].strip() for n in chosen)


# what a JSON-lines reader without --json-keys says of a file whose text is in another field
TEXT_FIELD_ONLY = ("name the field 'text' (these files are read by that field alone; `megatron-prune data "
                   "--json-keys FIELD` reads others)")


def read_texts(paths: list[Path], flag: str = "--text") -> str:
    """Concatenate the documents of text files (whole) and JSON-lines files (a ``text`` field per line), read as
    ``megatron-prune data`` reads them: the format by suffix or by the first line, ``.gz`` unpacked, a byte that is not
    UTF-8 refused by line and column. ``flag`` names the files in errors."""
    from megatron.prune.data import check_input_file, json_document, numbered_lines, resolve_input_format

    docs: list[str] = []
    for p in map(Path, paths):
        check_input_file(p, flag, several=True)
        lines = numbered_lines(p, flag)
        if resolve_input_format(p, flag=flag) == "text":
            docs.append("".join(line for _, line in lines))
        else:
            docs.extend(json_document(line, "text", f"{flag} {p}:{n}", TEXT_FIELD_ONLY) for n, line in lines
                        if line.strip())
    if not any(d.strip() for d in docs):
        raise PruneError(f"{flag} {' '.join(map(str, paths))}: no text")
    return "\n\n".join(docs)


def main(argv: list[str] | None = None) -> int:
    """``python -m megatron.prune.text [calib|eval] > corpus.txt``: the built-in text as a plain-text corpus
    (documents separated by blank lines), what ``megatron-prune data`` and ``vocab count`` read."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m megatron.prune.text", description=main.__doc__)
    p.add_argument("split", nargs="?", choices=SPLITS, default="calib",
                   help="calib (default: Python's documentation, ~100k tokens) or eval (the held-out part)")
    sys.stdout.write(builtin_text(p.parse_args(argv).split) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
