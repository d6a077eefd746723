"""Weight reconstruction after pruning: least-squares refit of the weights that read a pruned axis.

`solve` holds the math (moments, damped solves, ReplaceMe fit), `layer` refits one decoder layer from its
calibration inputs, `sequential` walks the model one layer at a time, `store` keeps the refitted tensors on
disk until the writer takes them, and `run` is what `megatron-prune prune --reconstruct` calls.
"""
