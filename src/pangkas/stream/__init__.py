"""Models larger than memory: pruning a Hugging Face checkpoint directory block by block, its
model built on ``meta`` and materialised one block at a time from the shards.

``prune_weights(directory, output, ...)``: streamed weight pruning (``stream.weights``).
"""

from .weights import prune_weights

__all__ = ["prune_weights"]
