import copy

import pytest
import torch
from torch import nn

import pangkas


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def batches(n=6):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 8, generator=g) for _ in range(n)]


def zeros(layer):
    return float((layer.weight == 0).float().mean())


def test_cubic_schedule():
    schedule = pangkas.GradualPruning(mlp(), 0.8, start=10, end=20)
    assert schedule.sparsity_at(5) == 0 and schedule.sparsity_at(10) == 0
    assert schedule.sparsity_at(15) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert schedule.sparsity_at(20) == pytest.approx(0.8) == schedule.sparsity_at(99)


def test_gradual_pruning_in_a_plain_loop():
    model = mlp()
    schedule = pangkas.GradualPruning(model, 0.8, start=2, end=12, every=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    seen = []
    for step, x in enumerate(batches(8) * 2, start=1):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        schedule.step(step)
        seen.append(zeros(model[2]))
    assert seen == sorted(seen) and seen[0] == 0
    assert seen[-1] == pytest.approx(0.8, abs=1e-3) and seen[11] == pytest.approx(0.8, abs=1e-3)
    assert 0 < seen[5] < 0.8


def test_gradual_pruning_as_a_trainer_callback(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=32)
    model = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 50, (16, 8), generator=g)]
    schedule = pangkas.GradualPruning(model, 0.5, start=1, end=4, include="model.layers")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no")
    transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[schedule.trainer_callback()]).train()
    assert zeros(model.model.layers[0].mlp.up_proj) == pytest.approx(0.5, abs=1e-3)


def test_iterative_weights_channels_layers():
    teacher = mlp().eval()
    data = batches()
    options = {"teacher": teacher, "epochs": 1, "lr": 1e-3}
    model = copy.deepcopy(teacher)
    reports = pangkas.iterative(model, data, kind="weights", final=0.75, steps=3, recover_options=options)
    assert [round(r.sparsity, 3) for r in reports] == [round(0.75 * (1 - (1 - k / 3) ** 3), 3) for k in (1, 2, 3)]
    model = copy.deepcopy(teacher)
    pangkas.iterative(model, data, kind="channels", final=0.75, steps=2, example_inputs=data[0],
                      recover_options=options)
    assert model[0].out_features == 8 and model[2].out_features == 8  # 32 -> 16 -> 8
    stack = nn.Sequential(nn.Linear(8, 16), *[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(4)],
                          nn.Linear(16, 4))
    teacher = copy.deepcopy(stack).eval()
    reports = pangkas.iterative(stack, data, kind="layers", final=2, steps=2,
                                recover_options={"teacher": teacher, "epochs": 1})
    assert len(reports) == 2 and len(stack) == 4


@pytest.mark.parametrize("kwargs,message", [
    (dict(final_sparsity=1.0, start=0, end=5), "final_sparsity"),
    (dict(final_sparsity=0.5, start=5, end=5), "start < end"),
    (dict(final_sparsity=0.5, start=0, end=5, every=0), "every"),
])
def test_bad_schedule(kwargs, message):
    with pytest.raises(pangkas.PangkasError, match=message):
        pangkas.GradualPruning(mlp(), **kwargs)
