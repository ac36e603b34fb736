"""Public ops (drop-in functions; each has cpp/cuda/triton/reference backends)."""

from unlearn_ext.ops.ce_norm import fused_linear_ce_norm
from unlearn_ext.ops.masked_kl import fused_linear_masked_kl
from unlearn_ext.ops.sq_grad import sq_grad_conv2d, sq_grad_embedding, sq_grad_linear

# Names of the compiled ops behind the public functions (for `unlearn info` and tests).
OPS = ("sq_grad_linear", "sq_grad_conv2d", "sq_grad_embedding", "fused_linear_masked_kl", "fused_linear_ce_norm")
__all__ = [
    "OPS",
    "fused_linear_ce_norm",
    "fused_linear_masked_kl",
    "sq_grad_conv2d",
    "sq_grad_embedding",
    "sq_grad_linear",
]
