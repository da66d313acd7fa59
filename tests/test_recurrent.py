"""nn.LSTM / nn.GRU / nn.RNN: hidden units and input features removed exactly (integrations.recurrent)."""

import copy

import pytest
import torch
from torch import nn

import pangkas
from pangkas.integrations.recurrent import OneOpGRU, OneOpLSTM, OneOpRNN
from pangkas.oracle import oracle_error, randomize

KINDS = {"lstm": (nn.LSTM, {}), "gru": (nn.GRU, {}), "rnn_tanh": (nn.RNN, {}),
         "rnn_relu": (nn.RNN, {"nonlinearity": "relu"})}
ONE_OP = {nn.LSTM: OneOpLSTM, nn.GRU: OneOpGRU, nn.RNN: OneOpRNN}


class Tagger(nn.Module):
    """Linear producer -> recurrent layer(s) -> Linear consumer on every step."""

    def __init__(self, kind="lstm", features=6, width=8, hidden=12, **options):
        super().__init__()
        cls, defaults = KINDS[kind]
        self.batch_first = options.get("batch_first", False)
        self.embed = nn.Linear(features, width)
        self.rnn = cls(width, hidden, **defaults, **options)
        directions = 2 if options.get("bidirectional") else 1
        self.head = nn.Linear(directions * (options.get("proj_size") or hidden), 3)

    def forward(self, x):
        output, _ = self.rnn(torch.tanh(self.embed(x)))
        return self.head(output)


def sequences(batch_first=False, batch=2, steps=5, features=6):
    return torch.randn(batch, steps, features) if batch_first else torch.randn(steps, batch, features)


def pruned_exactly(model, x, ratio=0.5):
    model = randomize(model.eval())
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=ratio))
    assert error <= 1e-5
    return plan.model


CASES = [
    ("lstm", {}), ("gru", {}), ("rnn_tanh", {}), ("rnn_relu", {}),
    ("lstm", {"num_layers": 2}), ("gru", {"num_layers": 2, "bidirectional": True}),
    ("rnn_tanh", {"bidirectional": True, "batch_first": True}), ("lstm", {"num_layers": 2, "bidirectional": True}),
    ("lstm", {"proj_size": 4}), ("lstm", {"proj_size": 4, "num_layers": 2, "bidirectional": True}),
    ("lstm", {"bias": False, "batch_first": True}), ("gru", {"bias": False, "num_layers": 2}),
    ("lstm", {"bias": False, "proj_size": 6, "num_layers": 3}),
]


@pytest.mark.parametrize("kind,options", CASES, ids=[f"{k}-{'-'.join(map(str, o.items()))}" for k, o in CASES])
def test_hidden_units_and_input_features_go_exactly(kind, options):
    model = Tagger(kind, **options)
    pruned = pruned_exactly(model, sequences(options.get("batch_first", False)))
    rnn = pruned.rnn
    assert rnn.hidden_size == 6 and rnn.input_size == 4
    assert rnn.proj_size == (options.get("proj_size", 0) // 2)
    assert pruned.embed.out_features == 4 and pruned.head.in_features < model.head.in_features
    gates = {"lstm": 4, "gru": 3}.get(kind, 1)
    for name, p in rnn.named_parameters():
        if name.startswith(("weight_ih", "weight_hh", "bias")):
            assert p.shape[0] == gates * 6, name
    assert type(rnn) is type(model.rnn)  # it runs as itself, not as the traced form


@pytest.mark.parametrize("kind,options", [("lstm", {}), ("lstm", {"proj_size": 4}), ("gru", {}), ("rnn_relu", {})])
def test_plan_counts_the_recurrent_macs_as_a_real_forward_does(kind, options):
    # CPUs run a plain LSTM as oneDNN layers, the others as matrix products per step: same count
    model, x = Tagger(kind, num_layers=2, bidirectional=True, **options).eval(), sequences()
    plan = pangkas.plan_channels(model, x, ratio=0.5)
    assert plan.macs_before == pangkas.measure(model, x, latency=False).macs
    plan.apply()
    assert plan.macs_after == pangkas.measure(model, x, latency=False).macs < plan.macs_before / 2


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("given_state", [False, True])
@pytest.mark.parametrize("batched", [True, False])
def test_traced_form_computes_what_the_module_does(cls, batch_first, given_state, batched):
    torch.manual_seed(0)
    options = {"proj_size": 3} if cls is nn.LSTM else {}
    m = cls(5, 7, num_layers=2, bidirectional=True, batch_first=batch_first, **options).eval()
    one_op = copy.deepcopy(m)
    one_op.__class__ = ONE_OP[cls]
    x = torch.randn(4, 5) if not batched else sequences(batch_first, batch=2, steps=4, features=5)
    batch = (2,) if batched else ()
    hx = None
    if given_state:
        h0 = torch.randn(4, *batch, 3 if cls is nn.LSTM else 7)
        hx = (h0, torch.randn(4, *batch, 7)) if cls is nn.LSTM else h0
    want, got = m(x, hx), one_op(x, hx)
    for a, b in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


class StateFromContext(nn.Module):
    """A decoder whose initial state is computed from a context vector (captioning, seq2seq)."""

    def __init__(self):
        super().__init__()
        self.init_h, self.init_c = nn.Linear(4, 10), nn.Linear(4, 10)
        self.rnn = nn.LSTM(6, 10, num_layers=2)
        self.head = nn.Linear(10, 3)

    def forward(self, x, context):
        layers = self.rnn.num_layers
        h0 = torch.tanh(self.init_h(context)).unsqueeze(0).expand(layers, -1, -1).contiguous()
        c0 = self.init_c(context).unsqueeze(0).expand(layers, -1, -1).contiguous()
        output, _ = self.rnn(x, (h0, c0))
        return self.head(output)


def test_a_state_computed_from_weights_is_cut_with_the_units():
    x = (torch.randn(5, 2, 6), torch.randn(2, 4))
    pruned = pruned_exactly(StateFromContext(), x)
    assert pruned.rnn.hidden_size == 5 and pruned.init_h.out_features == pruned.init_c.out_features == 5


class GivenState(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.rnn = nn.GRU(8, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x, h0):
        return self.head(self.rnn(self.embed(x), h0)[0])


def test_a_given_initial_state_keeps_the_units():
    x = (torch.randn(5, 2, 6), torch.randn(1, 2, 10))
    pruned = pruned_exactly(GivenState(), x)
    assert pruned.rnn.hidden_size == 10 and pruned.rnn.input_size == 4  # its input features still go
    plan = pangkas.plan_channels(GivenState(), x, ratio=0.5)
    assert any("initial hidden state (h0) is unlabelled" in why for why in plan.blocked())


class TextClassifier(nn.Module):
    """Embedding -> LSTM -> Linear on the last step: the usual small text classifier."""

    def __init__(self, vocabulary=50, width=16, hidden=24, classes=4):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, width)
        self.lstm = nn.LSTM(width, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.classify = nn.Linear(2 * hidden, classes)

    def forward(self, tokens):
        output, _ = self.lstm(self.embedding(tokens))
        return self.classify(output[:, -1])


def test_text_classifier_prunes_and_round_trips(tmp_path):
    model, tokens = randomize(TextClassifier().eval()), torch.randint(0, 50, (3, 7))
    before = pangkas.measure(model, tokens, latency=False)
    report = pangkas.prune_channels(model, tokens, ratio=0.5)
    after = pangkas.measure(model, tokens, latency=False)
    assert model.lstm.hidden_size == 12 and model.lstm.input_size == 8 and model.embedding.embedding_dim == 8
    assert after.params < 0.5 * before.params and after.macs < 0.3 * before.macs
    assert report.macs_after == after.macs
    path = pangkas.save(model, tmp_path / "classifier.safetensors")
    fresh = pangkas.load(path, TextClassifier())
    assert fresh.lstm.hidden_size == 12 and fresh.lstm.input_size == 8
    torch.testing.assert_close(fresh(tokens), model(tokens), rtol=0, atol=0)


def test_failed_surgery_restores_the_sizes(monkeypatch):
    model, x = randomize(Tagger("lstm", num_layers=2).eval()), sequences()
    plan = pangkas.plan_channels(model, x, ratio=0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(pangkas.verify, "runs_as_itself", broken)
    with pytest.raises(RuntimeError, match="injected"):
        plan.apply()
    assert (model.rnn.hidden_size, model.rnn.input_size) == (12, 8)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model(x)  # still runs as it was


def test_unbatched_sequences_prune_exactly():
    pruned = pruned_exactly(Tagger("gru", num_layers=2, bidirectional=True), torch.randn(5, 6))
    assert pruned.rnn.hidden_size == 6 and pruned.rnn.input_size == 4


class ZerosMadeInForward(nn.Module):
    """The tutorial pattern: an explicit zero state built in forward from the model's own size."""

    def __init__(self):
        super().__init__()
        self.hidden = 10
        self.rnn = nn.RNN(6, self.hidden, batch_first=True)
        self.head = nn.Linear(self.hidden, 3)

    def forward(self, x):
        h0 = torch.zeros(1, x.shape[0], self.hidden)
        return self.head(self.rnn(x, h0)[0][:, -1])


def test_a_state_made_in_forward_keeps_the_units():
    """Its width is the model's constant, which surgery cannot follow."""
    x = torch.randn(2, 5, 6)
    plan = pangkas.plan_channels(ZerosMadeInForward(), x, ratio=0.5)
    assert plan.channels_removed == 0
    assert plan.blocked()["initial hidden state (h0) is unlabelled (a model input or constant) (recurrent)"] == 10


def test_planning_leaves_the_module_as_it_was():
    model, x = randomize(Tagger("lstm", num_layers=2, proj_size=4).eval()), sequences()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    want = model(x)
    pangkas.plan_channels(model, x, ratio=0.5)
    assert type(model.rnn) is nn.LSTM
    assert all(w is getattr(model.rnn, n) for w, n in zip(model.rnn._flat_weights, model.rnn._flat_weights_names))
    assert all(v.device.type == "cpu" and torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)


class ScrambledWeights(nn.Module):
    """Calls the traced op with a weight whose dims lost their channel ids (flattened and back)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.rnn = nn.GRU(8, 10)

    def forward(self, x):
        weights = [getattr(self.rnn, name) for name in self.rnn._flat_weights_names]
        weights[1] = weights[1].flatten().view_as(weights[1])
        return torch.ops.pangkas.recurrent(self.embed(x), None, None, weights, "GRU", 1, False, True, False,
                                           0.0, False)[0].sum(-1)


def test_weights_without_ids_keep_their_channels():
    plan = pangkas.plan_channels(ScrambledWeights(), torch.randn(5, 2, 6), ratio=0.5)
    assert plan.channels_removed == 0
    assert plan.blocked()["recurrent weights without channel ids on every dim (recurrent)"] == 8
