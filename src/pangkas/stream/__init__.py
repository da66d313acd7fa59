"""Models larger than memory: pruning a Hugging Face checkpoint directory block by block, its
model built on ``meta`` and materialised one block at a time from the shards.

``prune_weights(directory, output, ...)``: streamed weight pruning (``stream.weights``).
``prune_transformer(directory, output, heads=, ffn=, hidden=, ...)``: streamed removal of heads,
MLP neurons and hidden size (``stream.structure``).
``prune_layers(directory, output, n=, data=, ...)``: streamed removal of whole blocks
(``stream.layers``).
"""

from .layers import prune_layers
from .structure import prune_transformer
from .weights import prune_weights

__all__ = ["prune_layers", "prune_transformer", "prune_weights"]
