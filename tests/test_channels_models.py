"""Channel pruning on real architectures (random init, reduced input sizes), and what a pruned
model must still do: save/load into a fresh instance, export to ONNX."""

import pytest
import torch

import pangkas
from pangkas.oracle import oracle_error, randomize

torchvision = pytest.importorskip("torchvision")

SUBSET = {  # the representative subset: every coupling rule appears in at least one of these
    "resnet18": 64, "mobilenet_v3_large": 64, "densenet121": 64, "efficientnet_b0": 64,
    "convnext_tiny": 64, "shufflenet_v2_x1_0": 64, "vit_b_16": 32, "swin_t": 64,
}


def build(name: str, size: int):
    kwargs = {"image_size": size} if name.startswith("vit") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


@pytest.mark.parametrize("name", SUBSET)
def test_oracle_on_torchvision(name):
    size = SUBSET[name]
    model = randomize(build(name, size))
    x = torch.randn(1, 3, size, size)
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert error <= 1e-5, (name, error)
    assert plan.channels_removed > 0 and plan.macs_after < 0.9 * plan.macs_before, str(plan)


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_oracle_on_every_torchvision_classifier(name):
    size = 299 if "inception" in name else 224
    model = randomize(torchvision.models.get_model(name, weights=None).eval())
    x = torch.randn(1, 3, size, size)
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert error <= 1e-5 and plan.channels_removed > 0


def test_pruned_model_round_trips_into_a_fresh_instance(tmp_path):
    model = build("resnet18", 64)
    x = torch.randn(2, 3, 64, 64)
    pangkas.prune_weights(model, sparsity=0.5)
    pangkas.prune_channels(model, x, ratio=0.5)
    path = pangkas.save(model, tmp_path / "r18.safetensors")
    fresh = pangkas.load(path, build("resnet18", 64))
    assert fresh.layer1[0].conv1.out_channels == model.layer1[0].conv1.out_channels == 32
    assert fresh.fc.in_features == 256
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert pangkas.weights.masks.get_mask(fresh.layer1[0].conv1) is not None  # masks came back


def test_load_refuses_a_larger_file_and_leaves_the_model(tmp_path):
    path = pangkas.save(build("resnet18", 64), tmp_path / "dense.safetensors")
    small = build("resnet18", 64)
    pangkas.prune_channels(small, torch.randn(1, 3, 64, 64), ratio=0.5)
    shapes = {n: p.shape for n, p in small.named_parameters()}
    with pytest.raises(pangkas.PangkasError, match="does not fit"):
        pangkas.load(path, small)
    assert {n: p.shape for n, p in small.named_parameters()} == shapes


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_onnx_export_of_pruned_model(name, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = randomize(build(name, 64))
    x = torch.randn(1, 3, 64, 64)
    pangkas.prune_channels(model, x, ratio=0.5)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    session = onnxruntime.InferenceSession(str(path))
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-5)
