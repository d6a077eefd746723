"""``python -m megatron.prune``: the same as the ``megatron-prune`` command."""

import sys

from megatron.prune.cli import main

sys.exit(main())
