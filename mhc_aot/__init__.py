"""mhc-aot: Manifold-Constrained Hyper-Connections (arXiv 2512.24880) for MLX, kernels compiled ahead of time."""

from . import ops
from .layer import MHCLayer, MHCRewire

__version__ = "0.1.0"

__all__ = ["MHCLayer", "MHCRewire", "ops", "__version__"]
