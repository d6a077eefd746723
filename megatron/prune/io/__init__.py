"""Writing safely and fast: atomic output folders, direct I/O, the streaming torch writer, memory helpers."""
