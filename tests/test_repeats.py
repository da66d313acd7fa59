"""Repeated blocks: stacks of same-class layers, and the same place in each."""

from torch import nn

from pangkas.repeats import is_stack, same_place


def test_a_stack_is_a_list_or_sequential_of_several_modules_of_one_class():
    assert is_stack(nn.ModuleList([nn.Linear(2, 2), nn.Linear(3, 3)]))
    assert is_stack(nn.Sequential(nn.ReLU(), nn.ReLU()))
    assert not is_stack(nn.ModuleList([nn.Linear(2, 2)]))  # one is no repetition
    assert not is_stack(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    assert not is_stack(nn.ModuleDict({"a": nn.ReLU(), "b": nn.ReLU()}))


def test_same_place_replaces_every_index_and_nothing_else():
    assert same_place("encoder.layer.3.attention.self") == "encoder.layer.*.attention.self"
    assert same_place("0.1.conv2") == "*.*.conv2"
    assert same_place("layer10.block2") == "layer10.block2"  # digits inside a name stay
    assert same_place("") == ""
