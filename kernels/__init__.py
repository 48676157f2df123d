"""Per-token distillation divergences: Triton kernels, a PyTorch reference, and autograd glue.

Why this package exists: distillation spends its memory and time on the vocabulary dimension,
and the rock-token analysis needs every token's loss and gradient norm. ``reference`` is the one
plain-PyTorch definition of the math; ``triton_divergence`` holds the fused kernels (imported
lazily, only when the Triton backend is used); ``loss`` is what the train stage calls;
``fused_linear`` computes the loss from hidden states without materializing all logits.
See ``kernels/README.md``.
"""

if __name__ != "opdflow.kernels":
    # This directory imported as the top-level `kernels`: the checkout's root is on sys.path
    # (`python -m ...` or pytest started in it; Prefect's process worker runs flows there too),
    # so it shadows the `kernels` distribution transformers (>= 5.25) requires and imports. Hand
    # the import over to that distribution, found on sys.path without this checkout's root; with
    # none installed, the import fails as it would have without the checkout.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        __name__, [p for p in _sys.path if _os.path.realpath(p or _os.curdir) != _root])
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r} ({_root}/kernels is opdflow.kernels, not a "
                                  "top-level package)", name=__name__)
    _real = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _real  # what the import statement returns (importlib reads sys.modules back)
    _spec.loader.exec_module(_real)
else:
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
