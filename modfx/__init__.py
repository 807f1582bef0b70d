"""modfx: Mixture-of-Depths as a PyTorch compiler transformation."""

from .api import (
    aux_loss,
    plan,
    routing_parameters,
    routing_stats,
    set_routing,
    trainable_routing_parameters,
    transform,
)
from .config import MoDConfig
from .errors import ModfxError
from .flops import flops
from .generate import generate
from .io import export, export_aoti, load, save

__all__ = [
    "transform",
    "MoDConfig",
    "plan",
    "set_routing",
    "routing_stats",
    "aux_loss",
    "routing_parameters",
    "trainable_routing_parameters",
    "flops",
    "generate",
    "save",
    "load",
    "export",
    "export_aoti",
    "ModfxError",
]
__version__ = "0.1.0"
