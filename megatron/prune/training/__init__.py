"""Recovery training on the stock ``megatron.training.pretrain`` loop: LLaMA provider, data, KD."""
