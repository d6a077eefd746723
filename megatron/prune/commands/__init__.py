"""One module per CLI verb (see ``megatron.prune.cli.VERBS``)."""

import argparse

from megatron.prune.formats.mcore.schema import CKPT_FORMATS


def add_ckpt_format_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup, when: str = "") -> None:
    """The Megatron output-format flag, declared once for convert, reshard and prune."""
    p.add_argument("--ckpt-format", choices=CKPT_FORMATS, default=None,
                   help=f"{when}Megatron output format: torch (mp_rank_* files) or torch_dist "
                        "(megatron.core.dist_checkpointing, written by megatron-core's saver) (default torch)")
