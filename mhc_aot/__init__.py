"""mhc-aot: Manifold-Constrained Hyper-Connections (arXiv 2512.24880) for MLX, kernels compiled ahead of time."""

from . import ops
from .dynamic import DynamicMHC
from .layer import MHCLayer, MHCRewire

__version__ = "0.1.0"

__all__ = ["DynamicMHC", "MHCLayer", "MHCRewire", "ops", "__version__"]
