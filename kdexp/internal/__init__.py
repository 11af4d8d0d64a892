"""Framework-independent core of distillation from internal representations (Aguilar et al., AAAI 2020)."""

from kdexp.internal.internals import (
    PRE_DROPOUT_EAGER,
    ModelInternals,
    attention_implementation,
    eager_attention,
    encoder_layers,
    forward_with_internals,
    truncated_encoder,
)
from kdexp.internal.layer_map import LayerPair, parse_layer_map, resolve_layer_map, uniform_layer_map
from kdexp.internal.losses import (
    InternalLoss,
    InternalProjections,
    attention_kl,
    cls_cosine_loss,
    hidden_mse,
    internal_distillation_loss,
    layer_attention,
    layer_output,
    reconcile_attention_heads,
)
from kdexp.internal.stages import Stage, StageSchedule, build_stages, num_internal_stages, total_epochs_needed

__all__ = [
    "PRE_DROPOUT_EAGER",
    "InternalLoss",
    "InternalProjections",
    "LayerPair",
    "ModelInternals",
    "Stage",
    "StageSchedule",
    "attention_implementation",
    "attention_kl",
    "build_stages",
    "cls_cosine_loss",
    "eager_attention",
    "encoder_layers",
    "forward_with_internals",
    "hidden_mse",
    "internal_distillation_loss",
    "layer_attention",
    "layer_output",
    "num_internal_stages",
    "parse_layer_map",
    "reconcile_attention_heads",
    "resolve_layer_map",
    "total_epochs_needed",
    "truncated_encoder",
    "uniform_layer_map",
]
