"""CLI options, each checked on the model the command saved, loaded back."""

import math
import sys

import pytest
import torch
from torch import nn

import nets
import pangkas
from pangkas.cli import main
from pangkas.demo import digits_cnn
from pangkas.weights.masks import get_mask

SHAPE = ["--input-shape", "1,1,8,8"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def digits(tmp_path):
    """A digits_cnn with fixed weights, saved for ``--weights``: (the model, its weights file)."""
    torch.manual_seed(1)
    model = digits_cnn()
    return model, pangkas.save(model, tmp_path / "original.safetensors")


def prune_digits(capsys, weights, *args):
    return run(capsys, "prune", *args[:1], "pangkas.demo:digits_cnn", *SHAPE, "--weights", weights, *args[1:])


def layers(model, kinds=(nn.Conv2d, nn.Linear)):
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def test_threshold_zeroes_exactly_the_small_weights(capsys, tmp_path, digits):
    original, weights = digits
    every = torch.cat([m.weight.detach().abs().flatten() for m in layers(original).values()])
    threshold = float(every.median())  # about half of the weights at or below it
    out = tmp_path / "threshold.safetensors"
    code, _, err = prune_digits(capsys, weights, "weights", "--threshold", threshold, "-o", out)
    assert code == 0, err
    pruned = pangkas.load(out, digits_cnn())
    for name, module in layers(pruned).items():
        old = layers(original)[name].weight.detach()
        small = old.abs() <= threshold
        assert small.any() and (~small).any(), name  # both sides of the threshold in every layer
        new = module.weight.detach()
        assert torch.equal(new == 0, small), name     # zero exactly where |w| <= threshold
        assert torch.equal(new[~small], old[~small]), name  # the rest untouched
    state = original.state_dict()  # biases and BatchNorm: not weights a threshold applies to
    for key, value in pruned.state_dict().items():
        if not any(key == f"{name}.weight" for name in layers(pruned)):
            assert torch.equal(value, state[key]), key


def test_threshold_must_not_be_negative(capsys, tmp_path, digits):
    _, weights = digits
    out = tmp_path / "bad.safetensors"
    code, _, err = prune_digits(capsys, weights, "weights", "--threshold", "-0.5", "-o", out)
    assert code == 2 and "threshold" in err and not out.exists()


def test_exclude_leaves_the_named_layers_whole(capsys, tmp_path, digits):
    original, weights = digits
    excluded = {"0.0", "10"}  # the first convolution and the last Linear
    out = tmp_path / "exclude.safetensors"
    code, _, err = prune_digits(capsys, weights, "weights", "--sparsity", "0.5", "--exclude", "0", "10",
                                "-o", out)
    assert code == 0, err
    pruned = pangkas.load(out, digits_cnn())
    for name, module in layers(pruned).items():
        old = layers(original)[name].weight.detach()
        if name in excluded:
            assert get_mask(module) is None, name
            assert torch.equal(module.weight.detach(), old), name
        else:
            assert int((module.weight == 0).sum()) == round(0.5 * old.numel()), name


def channel_counts(model):
    """Output channels of every convolution and Linear but the classifier."""
    return {name: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for name, m in layers(model).items() if name != "10"}


def test_exclude_keeps_every_channel_of_the_named_modules(capsys, tmp_path, digits):
    original, weights = digits
    out = tmp_path / "exclude.safetensors"
    code, _, err = prune_digits(capsys, weights, "channels", "--ratio", "0.5", "--exclude", "3", "-o", out)
    assert code == 0, err
    pruned = pangkas.load(out, digits_cnn())
    for name in ("3.0", "3.1"):  # the ignored block: every tensor whole and unchanged
        for key, value in pruned.get_submodule(name).state_dict().items():
            assert torch.equal(value, original.get_submodule(name).state_dict()[key]), (name, key)
    widths = channel_counts(pruned)
    assert widths["3.0"] == 64 and widths["1.0"] == 32  # block 1 feeds block 3: its outputs stay too
    assert widths["0.0"] == 16 and widths["4.0"] == 32 and widths["7"] == 64  # the rest lost half
    assert pruned(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_round_to_keeps_multiples(capsys, tmp_path, digits):
    original, weights = digits
    sizes = channel_counts(original)
    target = {name: size - round(0.3 * size) for name, size in sizes.items()}  # 22, 45, 90: none a multiple of 8
    assert all(k % 8 for k in target.values())
    out = tmp_path / "plain.safetensors"
    code, _, err = prune_digits(capsys, weights, "channels", "--ratio", "0.3", "-o", out)
    assert code == 0, err
    assert channel_counts(pangkas.load(out, digits_cnn())) == target
    out = tmp_path / "round8.safetensors"
    code, _, err = prune_digits(capsys, weights, "channels", "--ratio", "0.3", "--round-to", "8", "-o", out)
    assert code == 0, err
    pruned = pangkas.load(out, digits_cnn())
    assert channel_counts(pruned) == {name: math.ceil(k / 8) * 8 for name, k in target.items()}
    assert pruned(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def auto_counts(capsys, tmp_path, weights, name):
    out = tmp_path / f"{name}.safetensors"
    code, _, err = prune_digits(capsys, weights, "channels", "--ratio", "0.3", "--round-to", "auto", "-o", out)
    assert code == 0, err
    pruned = pangkas.load(out, digits_cnn())
    assert pruned(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    return channel_counts(pruned)


def test_round_to_auto_picks_the_fastest_nearby_width(capsys, tmp_path, digits, monkeypatch):
    original, weights = digits
    sizes = channel_counts(original)
    target = {name: size - round(0.3 * size) for name, size in sizes.items()}
    # Measured on this CPU: the exact count, or a multiple of 8 at most 12.5% wider.
    for name, width in auto_counts(capsys, tmp_path, weights, "measured").items():
        k = target[name]
        assert width == k or (width % 8 == 0 and k < width <= k * 1.125), (name, k, width)

    # With the timings under our control, the choice is known: multiples of 8 twice as fast...
    channels = sys.modules["pangkas.channels"]
    timed = []

    def timer(module, input_shape):
        def seconds(width):
            timed.append(width)
            return 1.0 if width % 8 else 0.5
        return seconds

    monkeypatch.setattr(channels, "layer_timer", timer)
    assert auto_counts(capsys, tmp_path, weights, "eights") == {n: math.ceil(k / 8) * 8 for n, k in target.items()}
    assert timed  # the widths were timed, not guessed
    # ... or every extra channel costing time: the target itself.
    monkeypatch.setattr(channels, "layer_timer", lambda module, shape: lambda width: float(width))
    assert auto_counts(capsys, tmp_path, weights, "narrow") == target


@pytest.mark.parametrize("value", ["0", "-8", "eight", "1.5"])
def test_round_to_rejects_what_is_not_a_width(capsys, tmp_path, digits, value):
    _, weights = digits
    out = tmp_path / "bad.safetensors"
    code, _, err = prune_digits(capsys, weights, "channels", "--ratio", "0.3", "--round-to", value, "-o", out)
    assert code == 2 and "round" in err.replace("-", "_").lower() and not out.exists()


def test_allow_approximate_prunes_channels_under_a_layernorm(capsys, tmp_path):
    """nets.ChannelsLast: the residual stream (stem, dw, fc2) runs through a LayerNorm over its 16
    channels; fc1's 64 hidden channels do not."""
    spec = ["nets:ChannelsLast", "--input-shape", "2,3,8,8"]
    exact, approximate = tmp_path / "exact.safetensors", tmp_path / "approximate.safetensors"
    code, _, err = run(capsys, "prune", "channels", *spec, "--ratio", "0.5", "-o", exact)
    assert code == 0, err
    code, _, err = run(capsys, "prune", "channels", *spec, "--ratio", "0.5", "--allow-approximate",
                       "-o", approximate)
    assert code == 0, err
    kept = pangkas.load(exact, nets.ChannelsLast())
    assert kept.stem.out_channels == 16 and kept.norm.normalized_shape == (16,)
    assert kept.fc1.out_features == 32  # pruning did happen, outside the normalised channels
    cut = pangkas.load(approximate, nets.ChannelsLast())
    assert cut.stem.out_channels == 8 and cut.norm.normalized_shape == (8,) and cut.fc2.out_features == 8
    assert cut.fc1.out_features == 32
    assert cut(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_hidden_shrinks_a_hugging_face_models_hidden_size(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    out = tmp_path / "thin"
    code, _, err = run(capsys, "prune", "channels", tmp_path / "llama", "--hidden", "0.25",
                       "--input-shape", "1,12", "-o", out)
    assert code == 0, err
    again = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    hidden = 32 - round(0.25 * 32)
    assert again.config.hidden_size == hidden
    assert again.model.embed_tokens.weight.shape == (100, hidden) and again.lm_head.weight.shape == (100, hidden)
    assert again.model.norm.weight.shape == (hidden,)
    assert again.config.num_attention_heads == 4 and again.config.intermediate_size == 64  # only --hidden
    ids = torch.randint(0, 100, (1, 12))
    assert again(ids).logits.shape == (1, 12, 100)


@pytest.mark.parametrize("kind,option", [("weights", ["--sparsity", "0.5", "--exclude"]),
                                         ("channels", ["--ratio", "0.5", "--exclude"]),
                                         ("channels", ["--ratio", "0.5", "--include"])])
def test_exclude_and_include_refuse_names_that_match_nothing(capsys, tmp_path, digits, kind, option):
    _, weights = digits
    out = tmp_path / "typo.safetensors"
    code, _, err = prune_digits(capsys, weights, kind, *option, "no_such_layer", "-o", out)
    assert code == 2 and "no_such_layer" in err and not out.exists()


@pytest.mark.parametrize("kind,old,new", [
    ("weights", ["--sparsity", "0.5", "--method", "random"], ["--sparsity", "0.5", "--importance", "random"]),
    ("channels", ["--ratio", "0.5", "--ignore", "3"], ["--ratio", "0.5", "--exclude", "3"]),
    ("layers", ["--n", "1", "--criterion", "magnitude"], ["--n", "1", "--importance", "magnitude"]),
])
def test_old_flags_still_work_and_say_their_new_name(capsys, tmp_path, digits, kind, old, new):
    _, weights = digits
    torch.manual_seed(0)
    code, _, err = prune_digits(capsys, weights, kind, *new, "-o", tmp_path / "new.safetensors")
    assert code == 0 and "warning" not in err
    torch.manual_seed(0)
    code, _, err = prune_digits(capsys, weights, kind, *old, "-o", tmp_path / "old.safetensors")
    assert code == 0 and f"warning: {old[2]} is now {new[2]}" in err
    a, b = (pangkas.load(tmp_path / f"{n}.safetensors", digits_cnn()).state_dict() for n in ("old", "new"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reconstruct_refits_what_reads_the_removed_channels(capsys, tmp_path, digits):
    original, weights = digits
    data = tmp_path / "calib.safetensors"
    from safetensors.torch import save_file
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    save_file({"x": x}, data)
    files = {}
    for flag in ([], ["--reconstruct"]):
        out = tmp_path / f"c{len(flag)}.safetensors"
        code, _, err = prune_digits(capsys, weights, "channels", "--ratio", "0.5", "--importance", "l1",
                                    "--data", data, *flag, "-o", out)
        assert code == 0, err
        files[bool(flag)] = pangkas.load(out, digits_cnn())
    plain, refit = files[False], files[True]
    assert channel_counts(plain) == channel_counts(refit)
    with torch.no_grad():
        want = original.eval()(x)
        errors = {k: float((m.eval()(x) - want).norm() / want.norm()) for k, m in files.items()}
    assert errors[True] < errors[False], errors


def test_reconstruct_needs_data(capsys, tmp_path, digits):
    _, weights = digits
    code, _, err = prune_digits(capsys, weights, "channels", "--ratio", "0.5", "--reconstruct",
                                "-o", tmp_path / "x.safetensors")
    assert code == 2 and "--reconstruct needs calibration data" in err and "Traceback" not in err


def test_allocation_by_sensitivity(capsys, tmp_path, digits):
    _, weights = digits
    code, _, err = prune_digits(capsys, weights, "channels", "--ratio", "0.5", "--allocation", "sensitivity",
                                "-o", tmp_path / "x.safetensors")
    assert code == 2 and "--allocation sensitivity needs calibration data" in err and "Traceback" not in err
    data = tmp_path / "calib.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))}, data)
    counts = {}
    for how in ("uniform", "sensitivity"):
        out = tmp_path / f"{how}.safetensors"
        code, _, err = prune_digits(capsys, weights, "channels", "--ratio", "0.5", "--data", data,
                                    "--allocation", how, "-o", out)
        assert code == 0, err
        counts[how] = channel_counts(pangkas.load(out, digits_cnn()))
    assert counts["uniform"] != counts["sensitivity"]


def test_layers_target_macs_and_replace(capsys, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    out = tmp_path / "shallow.safetensors"
    code, text, err = run(capsys, "prune", "layers", "torchvision:resnet18", "--input-shape", "1,3,32,32",
                          "--target-macs", "0.8", "-o", out)
    assert code == 0, err
    pruned = pangkas.load(out, torchvision.models.resnet18(weights=None))
    dense = torchvision.models.resnet18(weights=None)
    x = torch.randn(1, 3, 32, 32)
    assert pangkas.measure(pruned, x, latency=False).macs <= 0.8 * pangkas.measure(dense, x, latency=False).macs
    code, _, err = run(capsys, "prune", "layers", "torchvision:resnet18", "--input-shape", "1,3,32,32",
                       "--n", "1", "--replace", "linear", "-o", tmp_path / "r.safetensors")
    assert code == 2 and "replace='linear'" in err and "Traceback" not in err


def test_rotate_prunes_hidden_size_by_rotation(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    save_file({"input_ids": torch.randint(0, 100, (8, 12))}, tmp_path / "calib.safetensors")
    out = tmp_path / "thin"
    code, stdout, err = run(capsys, "prune", "channels", tmp_path / "llama", "--hidden", "0.25", "--rotate",
                            "--data", tmp_path / "calib.safetensors", "--input-shape", "1,12", "-o", out)
    assert code == 0, err
    assert "rotated and sliced" in stdout and "untied" in stdout
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # a plain directory
    assert again.config.hidden_size == 24 and again.config.tie_word_embeddings is False
    assert again(torch.randint(0, 100, (1, 12))).logits.shape == (1, 12, 100)


@pytest.mark.parametrize("args,message", [
    (["--rotate", "--hidden", "0.25"], "--rotate needs calibration data"),
    (["--rotate", "--ffn", "0.25", "--data", "CALIB"], "hidden="),
    (["--rotate", "--hidden", "0.25", "--data", "CALIB", "--importance", "l1"], "importance"),
])
def test_rotate_refuses_what_it_cannot_do(capsys, tmp_path, args, message):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    save_file({"input_ids": torch.randint(0, 100, (4, 12))}, tmp_path / "calib.safetensors")
    args = [str(tmp_path / "calib.safetensors") if a == "CALIB" else a for a in args]
    out = tmp_path / "thin"
    code, _, err = run(capsys, "prune", "channels", tmp_path / "llama", *args, "--input-shape", "1,12", "-o", out)
    assert code == 2 and message in err and not out.exists()
