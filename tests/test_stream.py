"""pangkas.stream.prune_weights: a checkpoint directory pruned one block at a time gives the
weights in-memory pruning gives, bit for bit; only one block is ever loaded; a crash or interrupt
is continued by the same call; bad input is refused before anything is written."""

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import pangkas
import pangkas.stream
from pangkas import PangkasError
from pangkas.cli import main
from pangkas.stream import checkpoint as checkpoint_module
from pangkas.stream import weights as stream_weights
from pangkas.stream.output import PARTIAL, ResumableOutput

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

DATA = [torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]


def llama(tie=False, layers=3):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "llama"
    llama().save_pretrained(path, max_shard_size="100KB")  # several shards, a block across two
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


def in_memory(path, **options):
    model = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    report = pangkas.prune_weights(model, **options)
    return pangkas.finalize(model).state_dict(), report


def loaded(path):
    return transformers.LlamaForCausalLM.from_pretrained(path).state_dict()


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("options", [
    dict(importance="sparsegpt", sparsity=0.5, data=DATA),
    dict(importance="wanda", pattern="2:4", data=DATA),
    dict(importance="magnitude", sparsity=0.7),
    dict(importance="magnitude", threshold=0.02),
], ids=["sparsegpt", "wanda-2:4", "magnitude", "threshold"])
def test_streamed_equals_in_memory_bit_for_bit(checkpoint, tmp_path, options):
    options = {**options, "exclude": "lm_head"}
    want, want_report = in_memory(checkpoint, **options)
    report = pangkas.stream.prune_weights(checkpoint, tmp_path / "out", **options)
    assert same(loaded(tmp_path / "out"), want)
    assert (report.params, report.nonzero_before, report.nonzero_after) == \
        (want_report.params, want_report.nonzero_before, want_report.nonzero_after)
    assert [(l.name, l.nonzero_after) for l in report.layers] == [(l.name, l.nonzero_after) for l in want_report.layers]
    assert (tmp_path / "out" / "config.json").is_file() and not (tmp_path / f".out{PARTIAL}").exists()


def test_layers_outside_the_blocks_are_kept_and_reported(checkpoint, tmp_path):
    want, _ = in_memory(checkpoint, sparsity=0.5, exclude="lm_head")
    report = pangkas.stream.prune_weights(checkpoint, tmp_path / "out", sparsity=0.5)
    assert same(loaded(tmp_path / "out"), want)
    assert "outside the repeated blocks" in report.skipped["lm_head"] and "lm_head" in str(report)


def test_tied_single_file_checkpoint(tmp_path):
    llama(tie=True).save_pretrained(tmp_path / "tied")
    assert (tmp_path / "tied" / "model.safetensors").is_file()
    options = dict(importance="wanda", sparsity=0.5, data=DATA, exclude="lm_head")
    want, _ = in_memory(tmp_path / "tied", **options)
    pangkas.stream.prune_weights(tmp_path / "tied", tmp_path / "out", **options)
    assert same(loaded(tmp_path / "out"), want)


def test_one_block_is_loaded_at_a_time(checkpoint, tmp_path, monkeypatch):
    resident = []
    original = stream_weights.materialize

    def spy(module, prefix, source):
        original(module, prefix, source)
        model_blocks = module_owner["model"].model.layers
        resident.append(sum(not p.is_meta for b in model_blocks for p in b.parameters()))

    module_owner = {}
    skeleton = stream_weights.skeleton

    def remembered(directory):
        model, config = skeleton(directory)
        module_owner["model"] = model
        return model, config

    monkeypatch.setattr(stream_weights, "skeleton", remembered)
    monkeypatch.setattr(stream_weights, "materialize", spy)
    pangkas.stream.prune_weights(checkpoint, tmp_path / "out", importance="sparsegpt", sparsity=0.5, data=DATA,
                                 exclude="lm_head")
    per_block = sum(p.numel() > 0 for p in llama().model.layers[0].parameters())
    assert resident == [per_block] * 3  # each block alone in memory when it is loaded
    assert all(p.is_meta for p in module_owner["model"].parameters())  # and everything released after


def test_an_interrupted_run_continues_where_it_stopped(checkpoint, tmp_path, monkeypatch):
    options = dict(importance="sparsegpt", sparsity=0.5, data=DATA, exclude="lm_head")
    want, _ = in_memory(checkpoint, **options)
    write = ResumableOutput.write
    calls = []

    def crashing(self, unit, tensors, record):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(unit)
        write(self, unit, tensors, record)

    monkeypatch.setattr(ResumableOutput, "write", crashing)
    with pytest.raises(KeyboardInterrupt):
        pangkas.stream.prune_weights(checkpoint, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists() and (tmp_path / f".out{PARTIAL}").is_dir()
    monkeypatch.setattr(ResumableOutput, "write", write)
    with pytest.raises(PangkasError, match="other inputs, options or data"):
        pangkas.stream.prune_weights(checkpoint, tmp_path / "out", **{**options, "sparsity": 0.6})
    pruned = []
    prune_block = stream_weights._pruned_on_inputs
    monkeypatch.setattr(stream_weights, "_pruned_on_inputs", lambda block, *a: (pruned.append(block),
                                                                                  prune_block(block, *a)))
    pangkas.stream.prune_weights(checkpoint, tmp_path / "out", **options)
    assert len(pruned) == 1  # the two blocks written before the crash were not pruned again
    assert same(loaded(tmp_path / "out"), want)
    assert not (tmp_path / f".out{PARTIAL}").exists()


def test_bad_input_is_refused_before_anything_is_written(checkpoint, tmp_path):
    with pytest.raises(PangkasError, match="outside the repeated blocks.*include="):
        pangkas.stream.prune_weights(checkpoint, tmp_path / "a", sparsity=0.5, include=["lm_head", "*proj"])
    with pytest.raises(PangkasError, match="no selected layer is inside"):
        pangkas.stream.prune_weights(checkpoint, tmp_path / "a", sparsity=0.5, exclude="model.layers.*")
    with pytest.raises(PangkasError, match="needs data="):
        pangkas.stream.prune_weights(checkpoint, tmp_path / "a", importance="sparsegpt", sparsity=0.5,
                                     exclude="lm_head")
    with pytest.raises(PangkasError, match="needs about .* over max_memory"):
        pangkas.stream.prune_weights(checkpoint, tmp_path / "a", importance="sparsegpt", sparsity=0.5, data=DATA,
                                     exclude="lm_head", max_memory="10KB")
    with pytest.raises(PangkasError, match="max_memory must be a size"):
        pangkas.stream.prune_weights(checkpoint, tmp_path / "a", sparsity=0.5, exclude="lm_head", max_memory="lots")
    with pytest.raises(PangkasError, match="is the input|contains the input"):
        pangkas.stream.prune_weights(checkpoint, checkpoint, sparsity=0.5, exclude="lm_head", overwrite=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(PangkasError, match="not empty"):
        pangkas.stream.prune_weights(checkpoint, tmp_path / "full", sparsity=0.5, exclude="lm_head")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_pickled_and_damaged_checkpoints_are_refused(tmp_path):
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(json.dumps(llama().config.to_dict()))
    torch.save(llama().state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(PangkasError, match="pickled .bin files are never loaded"):
        pangkas.stream.prune_weights(tmp_path / "pickled", tmp_path / "a", sparsity=0.5, exclude="lm_head")
    llama().save_pretrained(tmp_path / "damaged")
    shard = tmp_path / "damaged" / "model.safetensors"
    tensors = safetensors.torch.load_file(shard)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    safetensors.torch.save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(PangkasError, match="has no tensor 'model.layers.1.mlp.up_proj.weight'"):
        pangkas.stream.prune_weights(tmp_path / "damaged", tmp_path / "b", sparsity=0.5, exclude="lm_head")
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(PangkasError, match="cannot read"):
        pangkas.stream.prune_weights(tmp_path / "damaged", tmp_path / "c", sparsity=0.5, exclude="lm_head")


def test_cli_prunes_a_directory_into_a_directory(checkpoint, tmp_path, capsys):
    data = tmp_path / "calib.safetensors"
    safetensors.torch.save_file({"input_ids": torch.cat(DATA)}, str(data))
    out = tmp_path / "out"
    code = main(["prune", "weights", str(checkpoint), "--importance", "sparsegpt", "--sparsity", "0.5", "--data",
                 str(data), "--batch-size", "4", "--exclude", "lm_head", "-o", str(out), "--max-memory", "1GB"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    want, _ = in_memory(checkpoint, importance="sparsegpt", sparsity=0.5, data=DATA, exclude="lm_head")
    assert same(loaded(out), want)
    capsys.readouterr()
    code = main(["prune", "weights", str(checkpoint), "--sparsity", "0.5", "--exclude", "lm_head", "-o",
                 str(tmp_path / "b"), "--max-memory", "1KB"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "max_memory" in err
    assert not (tmp_path / "b").exists()


# -- heads, MLP neurons, hidden size --------------------------------------------------------------

def in_memory_transformer(path, **options):
    model = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    pangkas.prune_transformer(model, DATA[0], **options)
    return model


@pytest.mark.parametrize("options", [
    dict(heads=0.5, ffn=0.5),
    dict(heads=0.5, ffn=0.25, importance="wanda", data=DATA),
    dict(hidden=0.25, ffn=0.5, importance="l2"),
], ids=["l1-heads-ffn", "wanda-heads-ffn", "l2-hidden-ffn"])
def test_streamed_structure_equals_in_memory(checkpoint, tmp_path, options):
    want = in_memory_transformer(checkpoint, **options)
    report = pangkas.stream.prune_transformer(checkpoint, tmp_path / "out", **options)
    got = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert same(got.state_dict(), want.state_dict())
    assert got.config.to_diff_dict() == want.config.to_diff_dict()
    assert report.params_after == sum(p.numel() for p in want.parameters()) < report.params_before


def test_per_layer_sizes_are_written_with_the_code_that_rebuilds_them(checkpoint, tmp_path):
    from pangkas.integrations.hf_directory import CODE_FILE, from_pretrained

    options = dict(ffn=0.5, include=["model.layers.0.*"])
    want = in_memory_transformer(checkpoint, **options)
    pangkas.stream.prune_transformer(checkpoint, tmp_path / "out", **options)
    assert (tmp_path / "out" / CODE_FILE).is_file()
    got = from_pretrained(transformers.LlamaForCausalLM, tmp_path / "out")
    assert same(got.state_dict(), want.state_dict())
    assert got.model.layers[0].mlp.up_proj.out_features == 64 and got.model.layers[1].mlp.up_proj.out_features == 128


def test_streamed_structure_refuses_what_it_cannot_measure(checkpoint, tmp_path):
    with pytest.raises(PangkasError, match="hidden= needs the LM head's inputs"):
        pangkas.stream.prune_transformer(checkpoint, tmp_path / "a", hidden=0.25, importance="wanda", data=DATA)
    with pytest.raises(PangkasError, match="loss_fn"):
        pangkas.stream.prune_transformer(checkpoint, tmp_path / "a", heads=0.5, importance="taylor", data=DATA)
    with pytest.raises(PangkasError, match="give at least one of heads=, ffn=, hidden="):
        pangkas.stream.prune_transformer(checkpoint, tmp_path / "a")
    assert not list(tmp_path.iterdir())


def test_streamed_structure_resumes_its_writing(checkpoint, tmp_path, monkeypatch):
    write = ResumableOutput.write

    def crashing(self, unit, tensors, record):
        if unit == "model.layers.2":
            raise KeyboardInterrupt
        write(self, unit, tensors, record)

    monkeypatch.setattr(ResumableOutput, "write", crashing)
    with pytest.raises(KeyboardInterrupt):
        pangkas.stream.prune_transformer(checkpoint, tmp_path / "out", heads=0.5, ffn=0.5)
    monkeypatch.setattr(ResumableOutput, "write", write)
    pangkas.stream.prune_transformer(checkpoint, tmp_path / "out", heads=0.5, ffn=0.5)
    want = in_memory_transformer(checkpoint, heads=0.5, ffn=0.5)
    assert same(loaded(tmp_path / "out"), want.state_dict())


def test_cli_streams_channels_with_max_memory(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["prune", "channels", str(checkpoint), "--heads", "0.5", "--ffn", "0.5", "--max-memory", "1GB",
                 "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert same(loaded(out), in_memory_transformer(checkpoint, heads=0.5, ffn=0.5).state_dict())
    capsys.readouterr()
    code = main(["prune", "channels", str(checkpoint), "--heads", "0.5", "--reconstruct", "--max-memory", "1GB",
                 "-o", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--reconstruct cannot be streamed" in err


# -- whole layers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("importance", ["block_influence", "magnitude"])
def test_streamed_layers_equal_in_memory(tmp_path, importance):
    llama(layers=5).save_pretrained(tmp_path / "in", max_shard_size="100KB")
    want = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "in").eval()
    expected = pangkas.prune_layers(want, DATA, n=2, importance=importance)
    report = pangkas.stream.prune_layers(tmp_path / "in", tmp_path / "out", n=2, data=DATA, importance=importance)
    assert sorted(report.removed) == sorted(expected.chosen)
    assert report.scores == pytest.approx(expected.plan.scores, abs=0)
    got = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert got.config.num_hidden_layers == 3 and same(got.state_dict(), want.state_dict())
    assert report.params_after == sum(p.numel() for p in got.parameters())
    x = DATA[0]
    assert torch.equal(got(x).logits, want(x).logits)


def test_streamed_layers_refusals(checkpoint, tmp_path):
    with pytest.raises(PangkasError, match="needs data="):
        pangkas.stream.prune_layers(checkpoint, tmp_path / "a", n=1)
    with pytest.raises(PangkasError, match="importance must be one of"):
        pangkas.stream.prune_layers(checkpoint, tmp_path / "a", n=1, data=DATA, importance="loss")
    with pytest.raises(PangkasError, match="removable block"):
        pangkas.stream.prune_layers(checkpoint, tmp_path / "a", n=1, data=DATA, include="nothing.*")
    assert not list(tmp_path.iterdir())


def test_cli_streams_layers_with_max_memory(tmp_path, capsys):
    llama(layers=4).save_pretrained(tmp_path / "in", max_shard_size="100KB")
    data = tmp_path / "calib.safetensors"
    safetensors.torch.save_file({"input_ids": torch.cat(DATA)}, str(data))
    code = main(["prune", "layers", str(tmp_path / "in"), "--n", "1", "--data", str(data), "--batch-size", "4",
                 "--max-memory", "1GB", "-o", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    want = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "in").eval()
    pangkas.prune_layers(want, DATA, n=1)
    assert same(loaded(tmp_path / "out"), want.state_dict())
    capsys.readouterr()
    code = main(["prune", "layers", str(tmp_path / "in"), "--target-macs", "0.5", "--max-memory", "1GB",
                 "-o", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--target-macs cannot be streamed" in err


def test_cli_run_in_a_fresh_process_prints_no_library_noise(checkpoint, tmp_path):
    """transformers imports torchao, which makes torch log deprecation lines on its own handler."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "pangkas.cli", "prune", "weights", str(checkpoint), "--sparsity",
                             "0.5", "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and "lm_head" in result.stdout
