"""One module per CLI verb (see ``megatron.prune.cli.VERBS``)."""
