#!/usr/bin/env python
''''exec "${PYTHON:-python}" "$0" "$@"  # also when started with bash: run this file with Python '''
"""Recovery training of a (pruned) LLaMA-family model on the stock Megatron loop.

Takes every ``megatron.training`` flag plus ``--kd-teacher-load/--kd-alpha/--kd-temperature``;
the logic lives in ``megatron/prune/training/recipe.py``. See ``scripts/check_model.sh``.
"""

import sys

from megatron.prune.training.recipe import main

if __name__ == "__main__":  # the guard matters: torch_dist saving re-imports __main__
    sys.exit(main())
