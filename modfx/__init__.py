"""modfx: Mixture-of-Depths as a PyTorch compiler transformation."""

from .api import plan, routing_stats, set_routing, transform
from .config import MoDConfig
from .errors import ModfxError
from .flops import flops
from .generate import generate

__all__ = ["transform", "MoDConfig", "plan", "set_routing", "routing_stats", "flops", "generate", "ModfxError"]
__version__ = "0.1.0"
