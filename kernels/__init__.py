"""Per-token distillation divergences: Triton kernels, a PyTorch reference, and autograd glue.

Why this package exists: distillation spends its memory and time on the vocabulary dimension,
and the rock-token analysis needs every token's loss and gradient norm. ``reference`` is the one
plain-PyTorch definition of the math; ``triton_divergence`` holds the fused kernels (imported
lazily, only when the Triton backend is used); ``loss`` is what the train stage calls;
``fused_linear`` computes the loss from hidden states without materializing all logits.
See ``kernels/README.md``.
"""

from .fused_linear import FusedLinearDistillationLoss, fused_linear_distillation_loss
from .loss import (
    BACKENDS,
    DistillationLoss,
    distillation_loss,
    divergence_and_grad,
    reduce_per_token,
    resolve_backend,
    triton_available,
)
from .reference import (
    AKL_MU,
    KINDS,
    TAIL_FLOOR,
    per_token_divergence,
    per_token_divergence_and_grad,
)

__all__ = [
    "AKL_MU",
    "BACKENDS",
    "KINDS",
    "TAIL_FLOOR",
    "DistillationLoss",
    "FusedLinearDistillationLoss",
    "distillation_loss",
    "divergence_and_grad",
    "fused_linear_distillation_loss",
    "per_token_divergence",
    "per_token_divergence_and_grad",
    "reduce_per_token",
    "resolve_backend",
    "triton_available",
]
