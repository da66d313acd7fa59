"""One reading of model outputs: every tensor, however nested, and the primary one."""

import collections

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput

import pangkas
from pangkas.outputs import first_tensor, primary_tensor, tensors

a, b, c, d = (torch.full((i + 1,), float(i)) for i in range(4))


def same(got, want):
    return len(got) == len(want) and all(x is y for x, y in zip(got, want))


def test_tensors_are_found_depth_first_in_every_container():
    pair = collections.namedtuple("Pair", "left right")
    output = ((a, [b, None, 3]), {"x": pair(c, "text"), "y": collections.OrderedDict(z=d)})
    assert same(tensors(output), [a, b, c, d])
    assert same(tensors(a), [a]) and tensors(None) == [] and tensors(1.5) == []


def test_a_hugging_face_output_gives_its_set_fields_in_order():
    output = SequenceClassifierOutput(loss=None, logits=b, hidden_states=(a, c))
    assert same(tensors(output), [b, a, c])
    assert same(tensors([BaseModelOutput(last_hidden_state=d), a]), [d, a])


def test_first_tensor_is_none_without_a_tensor():
    assert first_tensor(((None, 2), {"k": a})) is a
    assert first_tensor((None, {"k": "v"})) is None


def test_the_primary_tensor_is_the_logits_else_the_first():
    assert primary_tensor(SequenceClassifierOutput(loss=c, logits=b)) is b  # not the loss, first
    assert primary_tensor(BaseModelOutput(last_hidden_state=d, hidden_states=(a,))) is d
    assert primary_tensor(((a, b), c)) is a
    assert primary_tensor({"out": c}) is c
    with pytest.raises(pangkas.PangkasError, match="holds no tensor"):
        primary_tensor((None, 3))
