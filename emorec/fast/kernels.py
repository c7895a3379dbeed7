"""Fused kernels for a step that runs eagerly on a GPU, where compiling does not fuse it."""

import sys

import torch

from emorec.fast.static import Static
from emorec.tensors import base_of


def dispatch_kernels(model, fast, device: torch.device, static: Static | None) -> str:
    """Fused kernels where compiling does not fuse: Liger Kernel's RMSNorm and SwiGLU (Triton)
    on a GPU where the step runs eagerly and the package is installed, for the model types it
    patches. Liger replaces these modules' forward on this model; it also replaces their classes
    in the model type's transformers module, which is put back (a model built later in the
    process, on a CPU say, keeps transformers' own)."""
    if not (fast.fused_kernels and device.type == "cuda" and not (static and static.compiled)):
        return "none"
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return "none (liger-kernel not installed)"
    base = base_of(model)
    if getattr(base.config, "model_type", None) not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"none (Liger has no kernels for model type {base.config.model_type!r})"
    module = sys.modules[type(base).__module__]
    before = dict(vars(module))
    try:
        _apply_liger_kernel_to_instance(
            model=base, rope=False, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
        )
    except (ValueError, TypeError, AttributeError) as error:  # a model type or layout Liger does not know
        return f"none ({type(error).__name__}: {error})"
    finally:
        for name, value in before.items():
            if getattr(module, name, None) is not value:
                setattr(module, name, value)
    return "liger (RMSNorm, SwiGLU)"
