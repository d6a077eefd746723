"""Recovery training on the stock ``megatron.training.pretrain`` loop: :mod:`.recipe` (the script) with its pieces:
:mod:`.checks`, :mod:`.model`, :mod:`.teacher`, :mod:`.checkpoints`, :mod:`.datasets`, :mod:`.kd`, :mod:`.attention`;
:mod:`.throughput` reads the log."""
