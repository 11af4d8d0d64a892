"""Framework-independent core of distillation from internal representations (Aguilar et al., AAAI 2020)."""

from kdexp.internal.layer_map import LayerPair, parse_layer_map, resolve_layer_map, uniform_layer_map
from kdexp.internal.losses import InternalProjections, internal_terms, internal_weights
from kdexp.internal.stages import Stage, StageSchedule, build_stages, num_internal_stages, total_epochs_needed

__all__ = [
    "InternalProjections",
    "LayerPair",
    "Stage",
    "StageSchedule",
    "build_stages",
    "internal_terms",
    "internal_weights",
    "num_internal_stages",
    "parse_layer_map",
    "resolve_layer_map",
    "total_epochs_needed",
    "uniform_layer_map",
]
