"""pangkas: prune PyTorch models so they are really smaller and faster."""

from . import evaluate
from .channels import ChannelReport, Plan, plan_channels, prune_channels
from .compress import CompressReport, compress
from .errors import OperationFailed, PangkasError
from .export import OnnxExport, export_onnx
from .integrations.compressed_tensors import CompressedTensorsExport, export_compressed_tensors
from .integrations.hf_directory import save_pretrained
from .io import load, save
from .layers import LayerPlan, LayerReport, layer_candidates, plan_layers, prune_layers
from .measure import Measurement, compare, measure
from .quantize import QuantizeReport, quantize
from .recover import RecoveryReport, recover
from .reports import Report
from .schedules import GradualPruning, iterative
from .sensitivity import Sensitivity, sensitivity
from .transformer import TransformerPlan, plan_transformer, prune_transformer
from .weights import (
    SparseLinear, SparseReport, WeightPlan, WeightReport, finalize, plan_weights, prune_weights,
    to_sparse_inference,
)

__version__ = "0.1.0"

__all__ = [
    "ChannelReport", "Plan", "plan_channels", "prune_channels",
    "LayerPlan", "LayerReport", "layer_candidates", "plan_layers", "prune_layers",
    "TransformerPlan", "plan_transformer", "prune_transformer", "WeightPlan", "plan_weights", "Report",
    "RecoveryReport", "recover", "Sensitivity", "sensitivity", "GradualPruning", "iterative",
    "Measurement", "OperationFailed", "PangkasError", "SparseLinear", "SparseReport", "WeightReport",
    "CompressReport", "CompressedTensorsExport", "OnnxExport", "QuantizeReport", "export_compressed_tensors", "export_onnx", "quantize", "compare", "compress", "evaluate", "finalize", "load", "measure", "prune_weights", "save", "save_pretrained", "to_sparse_inference",
]
