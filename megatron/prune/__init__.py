"""megatron-prune: prune LLaMA-family models to any smaller shape, then recover them on Megatron.

A namespace portion beside megatron-core's ``megatron.core``; there is deliberately no
``megatron/__init__.py``.
"""

__version__ = "0.1.0"
