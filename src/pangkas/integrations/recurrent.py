"""``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``: hidden units and input features removed exactly.

On CPU torch runs a recurrent layer as per-step ATen ops (gate chunks, a zero initial state made
inside ``forward``) that no op-by-op rule can see as one unit. The tracer therefore runs these
modules as subclasses (same parameters, same maths) whose forward calls one custom op,
``pangkas::recurrent``, and that op's rule knows the layout. Hidden unit ``j`` is row
``g * hidden_size + j`` of every gate block ``g`` of ``weight_ih``, ``weight_hh`` and the biases,
and column ``j`` of whatever reads the hidden state: ``weight_hh`` (or ``weight_hr`` with
``proj_size``, whose rows are then units of their own), the next layer's ``weight_ih`` (per
direction) and the output's feature dim. The module has one ``hidden_size`` for every layer and
direction, so unit ``j`` leaves all of them together. The cut module runs as itself: its updater
sets ``input_size``, ``hidden_size`` and ``proj_size`` from the cut weights.

Kept (channels stay): a given initial state that is not computed from the model's weights (a
model input, zeros made in ``forward``): its values for a removed unit would still be read.
Inputs the subclass does not cover (``PackedSequence``) run through the original forward, whose
per-step ops have no rules, so their channels stay.
"""

from __future__ import annotations

import torch
from torch import Tensor, _VF, nn
from torch.utils.flop_counter import register_flop_formula

from ..graph.labels import Axis
from ..graph.rules import _join, _on_dim, bind, rule
from ..outputs import tensors
from .integration import Integration

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_KERNELS = {"LSTM": _VF.lstm, "GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}


@torch.library.custom_op("pangkas::recurrent", mutates_args=())
def recurrent(input: Tensor, h0: Tensor | None, c0: Tensor | None, weights: list[Tensor], mode: str,
              num_layers: int, bidirectional: bool, has_biases: bool, batch_first: bool, dropout: float,
              train: bool) -> list[Tensor]:
    """A whole ``nn.RNNBase`` layer stack on a padded batched input: [output, h_n] (+ [c_n] for LSTM).
    ``h0``/``c0`` None: the zero state."""
    h_shape, c_shape = _state_shapes(input, weights, mode, num_layers, bidirectional, batch_first)
    hx = input.new_zeros(h_shape) if h0 is None else h0
    if mode == "LSTM":
        hx = (hx, input.new_zeros(c_shape) if c0 is None else c0)
    return list(_KERNELS[mode](input, hx, weights, has_biases, num_layers, dropout, train, bidirectional,
                               batch_first))


@recurrent.register_fake
def _recurrent_shapes(input, h0, c0, weights, mode, num_layers, bidirectional, has_biases, batch_first, dropout,
                      train):
    h_shape, c_shape = _state_shapes(input, weights, mode, num_layers, bidirectional, batch_first)
    directions = 2 if bidirectional else 1
    output = input.new_empty((*input.shape[:-1], directions * h_shape[-1]))
    states = [input.new_empty(h_shape)] + ([input.new_empty(c_shape)] if mode == "LSTM" else [])
    return [output, *states]


def _state_shapes(input, weights, mode, num_layers, bidirectional, batch_first):
    """The shapes (layers * directions, batch, width) of h_n (width: the real hidden size, the
    columns of weight_hh) and c_n (hidden_size)."""
    stacked = num_layers * (2 if bidirectional else 1)
    batch = input.shape[0 if batch_first else 1]
    weight_hh = weights[1]
    return (stacked, batch, weight_hh.shape[1]), (stacked, batch, weight_hh.shape[0] // GATES[mode])


@register_flop_formula(torch.ops.pangkas.recurrent)
def _recurrent_flops(input_shape, h0_shape, c0_shape, weight_shapes, *args, out_shape=None, **kwargs) -> int:
    """Every weight matrix multiplies one vector per step and sequence (the gates' nonlinearities
    are not counted, as for any pointwise op)."""
    steps = 1
    for size in input_shape[:-1]:
        steps *= size
    return 2 * steps * sum(shape[0] * shape[1] for shape in weight_shapes if len(shape) == 2)


class _OneOp:
    """The forward of a recurrent module as one ``pangkas::recurrent`` call, for the tracer.

    Mirrors ``nn.LSTM``/``nn.GRU``/``nn.RNN.forward`` for padded inputs (batched or not); other
    inputs go to the original forward."""

    def forward(self, input, hx=None):
        if not self._covers(input, hx):
            return super().forward(input, hx)
        batched = input.dim() == 3
        h0, c0 = tuple(hx) if self.mode == "LSTM" and hx is not None else (hx, None)
        if not batched:
            input = input.unsqueeze(0 if self.batch_first else 1)
            h0, c0 = (None if h is None else h.unsqueeze(1) for h in (h0, c0))
        if hx is not None:
            self.check_forward_args(input, (h0, c0) if self.mode == "LSTM" else h0, None)
        weights = [getattr(self, name) for name in self._flat_weights_names]
        output, *state = torch.ops.pangkas.recurrent(input, h0, c0, weights, self.mode, self.num_layers,
                                                     self.bidirectional, self.bias, self.batch_first,
                                                     float(self.dropout), self.training)
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)
            state = [s.squeeze(1) for s in state]
        return output, (tuple(state) if self.mode == "LSTM" else state[0])

    def _covers(self, input, hx) -> bool:
        if not isinstance(input, Tensor) or input.dim() not in (2, 3):
            return False
        states = hx if isinstance(hx, (tuple, list)) else () if hx is None else (hx,)
        return all(isinstance(h, Tensor) and h.dim() == input.dim() for h in states) and (
            hx is None or (self.mode == "LSTM") == isinstance(hx, (tuple, list)))


class OneOpLSTM(_OneOp, nn.LSTM):
    """``nn.LSTM`` as the tracer follows it (see ``_OneOp``)."""


class OneOpGRU(_OneOp, nn.GRU):
    """``nn.GRU`` as the tracer follows it (see ``_OneOp``)."""


class OneOpRNN(_OneOp, nn.RNN):
    """``nn.RNN`` as the tracer follows it (see ``_OneOp``)."""


# -- the coupling rule -------------------------------------------------------------------------

class _Stack:
    """The weights of one ``pangkas::recurrent`` call by (layer, direction), as id arrays per dim."""

    def __init__(self, b: dict, ids: list[list[Tensor]]):
        self.mode, self.layers = b["mode"], b["num_layers"]
        self.directions = 2 if b["bidirectional"] else 1
        self.biased = b["has_biases"]
        self.per_cell = len(ids) // (self.layers * self.directions)  # w_ih, w_hh, [b_ih, b_hh], [w_hr]
        self.projected = self.per_cell == 3 + 2 * self.biased
        self.ids = ids

    @classmethod
    def of(cls, e, b: dict) -> "_Stack | None":
        """The stack, or None if some weight lacks ids on a dim (computed in an unforeseen way)."""
        ids = []
        for w in b["weights"]:
            axes = {ax.dims: ax.ids for ax in e.get(w)}
            if any((d,) not in axes for d in range(w.ndim)):
                return None
            ids.append([axes[(d,)] for d in range(w.ndim)])
        return cls(b, ids)

    def cell(self, layer: int, direction: int) -> list[list[Tensor]]:
        start = (layer * self.directions + direction) * self.per_cell
        return self.ids[start:start + self.per_cell]

    def cells(self):
        for layer in range(self.layers):
            for direction in range(self.directions):
                yield layer, direction, self.cell(layer, direction)

    def gate_rows(self, cell) -> list[Tensor]:
        """(gates, hidden_size) row ids of weight_ih, weight_hh and the biases."""
        blocks = cell[:4] if self.biased else cell[:2]
        return [dims[0].reshape(GATES[self.mode], -1) for dims in blocks]

    def units(self, cell) -> Tensor:
        """The ids a layer's output (and its h_n) carries: its projection's rows, or its hidden units."""
        return cell[-1][0] if self.projected else self.gate_rows(cell)[0][0]


@rule(torch.ops.pangkas.recurrent)
def recurrent_rule(e, func, args, kwargs, out):
    """See the module docstring: unit j goes from every gate block, layer and direction at once."""
    b = bind(func, args, kwargs)
    stack = _Stack.of(e, b)
    if stack is None:
        for t in tensors((args, kwargs)):
            e.block_tensor(t, "recurrent weights without channel ids on every dim")
        return
    hidden = stack.gate_rows(stack.cell(0, 0))[0][0]
    units = stack.units(stack.cell(0, 0))
    for layer, direction, cell in stack.cells():
        for rows in stack.gate_rows(cell):
            e.union(rows, hidden.expand_as(rows))
        own = stack.units(cell)
        e.union(own, units)
        if stack.projected:
            _join(e, hidden, cell[-1][1], "recurrent projection input", consumes=True)
        _join(e, units, cell[1][1], "recurrent hidden-to-hidden input", consumes=True)
        if layer > 0:
            for block in cell[0][1].reshape(stack.directions, -1):
                _join(e, units, block, "recurrent layer input", consumes=True)
    e.produce(hidden)
    if stack.projected:
        e.produce(units)
    _input_features(e, b["input"], stack)
    _initial_state(e, b.get("h0"), units, "initial hidden state (h0)")
    _initial_state(e, b.get("c0"), hidden, "initial cell state (c0)")
    _label_outputs(e, out, stack, units, hidden)


def _input_features(e, x: Tensor, stack: _Stack) -> None:
    """Layer 0 of every direction reads the input's last dim; sequence and batch dims carry no channels."""
    feature = x.ndim - 1
    x_ax, others = _on_dim(e.get(x), feature)
    for ax in others:
        e.block(ax.ids, "recurrence over a channel-labelled sequence or batch dim")
    if x_ax is not None and x_ax.dims != (feature,):
        e.block(x_ax.ids, "recurrent input over joint channel dims")
        x_ax = None
    for direction in range(stack.directions):
        _join(e, None if x_ax is None else x_ax.ids, stack.cell(0, direction)[0][1], "recurrent input",
              consumes=True)


def _initial_state(e, state: Tensor | None, ids: Tensor, what: str) -> None:
    """A given state's last dim is the units it starts; its other dims carry no channels. None is
    the zero state, which follows any cut."""
    if state is None:
        return
    ax, others = _on_dim(e.get(state), state.ndim - 1)
    for other in others:
        e.block(other.ids, f"{what} labelled on its layer or batch dim")
    if ax is not None and ax.dims != (state.ndim - 1,):
        e.block(ax.ids, f"{what} over joint channel dims")
        ax = None
    _join(e, None if ax is None else ax.ids, ids, what)


def _label_outputs(e, out, stack: _Stack, units: Tensor, hidden: Tensor) -> None:
    output, h_n, *c_n = out
    last = stack.layers - 1
    features = torch.cat([stack.units(stack.cell(last, d)) for d in range(stack.directions)])
    e.set(output, (Axis((output.ndim - 1,), features),))
    e.set(h_n, (Axis((h_n.ndim - 1,), units),))
    for cell_state in c_n:
        e.set(cell_state, (Axis((cell_state.ndim - 1,), hidden),))


# -- surgery -----------------------------------------------------------------------------------

def _update_sizes(m: nn.RNNBase, original: dict) -> None:
    """Surgery updater: the sizes follow layer 0's cut weights (every layer has the same)."""
    m.input_size = m.weight_ih_l0.shape[1]
    m.hidden_size = m.weight_ih_l0.shape[0] // GATES[m.mode]
    if m.proj_size:
        m.proj_size = m.weight_hr_l0.shape[0]


INTEGRATION = Integration(
    name="recurrent",
    traced_as={nn.LSTM: OneOpLSTM, nn.GRU: OneOpGRU, nn.RNN: OneOpRNN},
    updaters={nn.RNNBase: _update_sizes},
)
