"""The format-free core: model shapes, the roles of their tensors, the prune plan, the slicing rules, target
resolution and plan selection. Nothing here reads or writes a checkpoint."""
