# megatron-prune on an NGC PyTorch base: the image's CUDA torch, Transformer Engine and apex are kept.
# The whole clone is the build context (.dockerignore leaves out environments and caches), so the README's two
# commands run inside: `make demo`, `make test`. VENV=system makes them install into (and use) the image's Python,
# whose pip honours the image's pins (/etc/pip/constraint.txt): nothing the image ships is replaced.
#
# Build:  docker build -t megatron-prune .
# Use:    docker run --gpus all --rm -it -v $PWD/work:/work megatron-prune        (a shell in /opt/megatron-prune)
#         docker run --gpus all --rm megatron-prune make demo                      (or: make test)
FROM nvcr.io/nvidia/pytorch:25.09-py3

ENV VENV=system \
    MEGATRON_PRUNE_CACHE=/root/.cache/megatron-prune
WORKDIR /opt/megatron-prune
COPY . .
RUN make install && python -m megatron.prune --help >/dev/null

CMD ["bash"]
