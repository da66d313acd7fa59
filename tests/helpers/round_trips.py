"""A pruned model must survive ``torch.save`` / ``torch.load`` of the whole module (pickle)."""

import io

import torch


def assert_pickles(model, x) -> None:
    """The model pickled and unpickled computes exactly what it computes."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
