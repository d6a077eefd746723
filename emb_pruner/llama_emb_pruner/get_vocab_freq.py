#!/usr/bin/env python3
''''exec bash "${0%.py}.sh" "$@"  # started with bash, as the seed's README does: run the .sh beside it '''
"""Token frequencies of a corpus and the ids to keep, at the seed's path: python get_vocab_freq.py --help,
or bash get_vocab_freq.sh (see megatron/prune/seed/)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.prune.seed import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("get_vocab_freq"))
