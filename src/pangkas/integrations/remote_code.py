"""Rebuild a pruned Hugging Face model from its directory, without pangkas.

Some pruned sizes cannot be said in a config: BERT and GPT-2 derive ``head_dim`` from
``hidden_size / num_attention_heads``, so "9 heads of 32" has no config; per-layer sizes have
none either. pangkas then writes this file, verbatim, next to the weights as
``modeling_pangkas.py``, keeps the sizes the architecture is built from in ``config.json``, and
records what pruning changed under ``"pangkas_pruned"``. ``AutoModel.from_pretrained(dir,
trust_remote_code=True)`` builds the unpruned architecture, gives it the recorded shapes and
attributes, then loads the weights. The file imports only torch and transformers; pangkas reads
such directories with its own copy of this module and runs no code from them.
"""

import contextlib

import torch

RECORD = "pangkas_pruned"
BUILT_WITH = "_pangkas_built_with"  # on a model: config sizes its modules were built from


def _locate(model, dotted):
    """The submodule ``dotted`` names in the saved model, in ``model`` (whose class may be the
    saved one's base model or a model with a head on it); None if ``model`` has no such part."""
    prefix = getattr(model, "base_model_prefix", "")
    for name in (dotted, dotted[len(prefix) + 1:] if dotted.startswith(prefix + ".") else None,
                 f"{prefix}.{dotted}".rstrip(".") if prefix else None):
        if name is None:
            continue
        try:
            return model.get_submodule(name)
        except AttributeError:
            continue
    return None


def reshape(model, record):
    """Give ``model`` the pruned tensor shapes, module attributes and config sizes of ``record``
    (config entries are ``[built_with, pruned]``). Tensors are left uninitialized: the weights
    come from the checkpoint."""
    replaced = {}  # tied tensors stay tied
    for key, shape in record["tensors"].items():
        module_name, _, name = key.rpartition(".")
        module = _locate(model, module_name)
        if module is None:
            continue
        old = getattr(module, name)
        if id(old) not in replaced:
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            if isinstance(old, torch.nn.Parameter):
                new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
            replaced[id(old)] = new
        setattr(module, name, replaced[id(old)])
    for module_name, values in record["attributes"].items():
        module = _locate(model, module_name)
        for name, value in (values.items() if module is not None else ()):
            old = getattr(module, name)
            setattr(module, name, type(old)(value) if isinstance(old, (tuple, list)) else value)
    setattr(model, BUILT_WITH, {name: built for name, (built, _) in record["config"].items()})
    for name, (_, value) in record["config"].items():
        setattr(model.config, name, value)


@contextlib.contextmanager
def built_sizes(config, record):
    """``config`` says the sizes the architecture is built from, for the duration."""
    pruned_sizes = {name: getattr(config, name, None) for name in record["config"]}
    try:
        for name, (built, _) in record["config"].items():
            setattr(config, name, built)
        yield
    finally:
        for name, value in pruned_sizes.items():
            setattr(config, name, value)


def pruned(base):
    """``base`` (a transformers model class) that builds the shapes its config records."""

    class Pruned(base):
        def __init__(self, config, *args, **kwargs):
            record = getattr(config, RECORD)
            with built_sizes(config, record):
                super().__init__(config, *args, **kwargs)
            reshape(self, record)

        def save_pretrained(self, *args, **kwargs):  # as loaded: config.json keeps the built sizes
            with built_sizes(self.config, getattr(self.config, RECORD)):
                return super().save_pretrained(*args, **kwargs)

    Pruned.__name__ = Pruned.__qualname__ = base.__name__
    Pruned.pangkas_base = base
    return Pruned
