"""Structured pruning that shrinks the layers: importance, dependency groups (torch-pruning), shrink."""

from lightning_green.pruning.groups import HeadGroup, MlpGroup, default_forward
from lightning_green.pruning.pruner import MODES, PruneEvent, StructuredPruner, kept_units, linear_flops_per_token
from lightning_green.pruning.shrink import reshape_to_state_dict, sync_shape_fields

__all__ = [
    "MODES",
    "HeadGroup",
    "MlpGroup",
    "PruneEvent",
    "StructuredPruner",
    "default_forward",
    "kept_units",
    "linear_flops_per_token",
    "reshape_to_state_dict",
    "sync_shape_fields",
]
