"""Merged adapters at evaluation: LoRA-style adapters (LoRA, DoRA, IA3) folded into the base
weights while predicting, so inference runs the plain model with no adapter matmuls or casts.
The base weights are restored from a copy in host memory afterwards."""

import warnings
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from emorec.tensors import host_copy, is_quantized


def can_merge(model) -> bool:
    """A LoRA-style adapter on a plain base. Not on a 4/8-bit base (QLoRA): bitsandbytes' merge
    writes new quantised tensors, so neither restoring the weights nor unmerging is exact."""
    return isinstance(getattr(model, "base_model", None), BaseTuner) and not is_quantized(model)


@contextmanager
def merged_adapter(model):
    """Inside: the adapter folded into the base weights. On exit the base weights are restored
    bit for bit from a copy: unmerging by subtraction would leave bf16 rounding behind. Models
    without such an adapter are left as they are."""
    if not can_merge(model):
        yield
        return
    tuner = model.base_model
    layers = [m.get_base_layer() for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [(p, host_copy(p)) for layer in layers for p in layer.parameters(recurse=False)]
    tuner.merge_adapter()
    try:
        yield
    finally:
        with warnings.catch_warnings():  # IA3 warns that unmerging is inexact: the copy makes it exact
            warnings.simplefilter("ignore")
            tuner.unmerge_adapter()
        with torch.no_grad():
            for p, copy in saved:
                p.copy_(copy)
