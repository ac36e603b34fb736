"""unlearn_ext: fast machine unlearning for PyTorch.

Fused kernels (per-sample diagonal Fisher, ...) registered as torch custom ops, and the
model-level tools built on them. See README.md for the op table.
"""

from __future__ import annotations

__version__ = "0.1.0"

from unlearn_ext import _loader  # noqa: F401  (loads _C before the ops register fake kernels)
from unlearn_ext._loader import ExtensionNotBuiltError
from unlearn_ext.distributed import distributed_diagonal_fisher, unlearn_distributed
from unlearn_ext.fisher import diagonal_fisher
from unlearn_ext.methods import UnlearnResult, available_methods, get_method, unlearn
from unlearn_ext.ops import sq_grad_conv2d, sq_grad_embedding, sq_grad_linear
from unlearn_ext.production import apply_requests
from unlearn_ext.serving import swap_weights

__all__ = [
    "ExtensionNotBuiltError",
    "UnlearnResult",
    "available_methods",
    "get_method",
    "unlearn",
    "__version__",
    "apply_requests",
    "diagonal_fisher",
    "distributed_diagonal_fisher",
    "sq_grad_conv2d",
    "sq_grad_embedding",
    "sq_grad_linear",
    "swap_weights",
    "unlearn_distributed",
]
