"""modfx: Mixture-of-Depths as a PyTorch compiler transformation."""

from .api import plan, set_routing, transform
from .config import MoDConfig
from .errors import ModfxError

__all__ = ["transform", "MoDConfig", "plan", "set_routing", "ModfxError"]
__version__ = "0.1.0"
