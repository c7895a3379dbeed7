"""Model and tensor utilities that the objective, the engine and the builder share: the
transformer under its wrappers, the module that makes logits, device placement that never
stalls a GPU, host copies and right padding.

Every tensor is created on the model's device (tests/test_device.py checks the factories here).
"""

import threading

import torch
from accelerate.utils import extract_model_from_parallel
from torch.distributed.tensor import DTensor


def base_of(model):
    """The transformer under a PEFT wrapper (LoRA-style adapters live inside its modules;
    prompt-learning adapters act only through the wrapper's forward) and under a data-parallel
    wrapper (DDP)."""
    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def recomputes_activations(model) -> bool:
    """Whether the base is under activation checkpointing (transformers' name for it changed in
    5.x: is_activation_checkpointing, before is_gradient_checkpointing)."""
    base = base_of(model)
    if getattr(type(base), "is_activation_checkpointing", None) is not None:
        return bool(base.is_activation_checkpointing)
    return bool(getattr(base, "is_gradient_checkpointing", False))


def is_quantized(model) -> bool:
    """Whether the base's weights are 4/8-bit (a bitsandbytes base for QLoRA): transformers keeps
    its quantiser on the model."""
    base = base_of(model)
    return getattr(base, "hf_quantizer", None) is not None or bool(getattr(base, "is_quantized", False))


def pools(model) -> bool:
    """Whether the model is a decoder with a classification head over the labels (head=classifier,
    emorec.classifier): transformers' sequence classifier, whose forward keeps its head's logits at
    each row's last token only."""
    base = base_of(model)
    return base.get_output_embeddings() is None and isinstance(getattr(base, "score", None), torch.nn.Module)


def output_head(model) -> torch.nn.Module:
    """The module that turns final hidden states into logits: the LM head over the vocabulary,
    or a decoder classifier's head over the labels."""
    base = base_of(model)
    return base.score if pools(model) else base.get_output_embeddings()


def all_logits(model, **inputs) -> torch.Tensor:
    """Logits at every position of the model's output (batch, positions, vocabulary or labels).
    A decoder classifier's forward pools them at the last position that is not the pad token
    (the last position at all under a soft prompt), so a hook on its head reads them all; they
    then mean for it what they mean for a causal LM: position t's logits see tokens up to t."""
    if not pools(model):
        return model(**inputs).logits
    taken, me = [], threading.get_ident()

    def take(module, args, output):
        if threading.get_ident() == me:  # evaluation streams run the model in other threads too
            taken.append(output)

    handle = output_head(model).register_forward_hook(take)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return taken[-1]


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def on_device(data: list, device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A tensor of `data` (indices, token ids) on `device`. A plain copy to a GPU waits for
    everything queued there; this one goes through pinned memory, asynchronously, so building a
    batch's indices never stalls the GPU's work."""
    host = torch.tensor(data, dtype=dtype)  # on the host: the one tensor here built there
    if device is not None and torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: a sharded weight's own shard (FSDP2 makes weights
    DTensors: emorec.sharded), any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def trained_weights(model) -> dict:
    """The weights that train, by name (a tied weight under its first name only)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` in host memory (weights kept aside: merged adapters' originals, the best
    epoch's): on a GPU it takes no device memory (2.7 GB of q/k/v/o projections at 8 B
    parameters; a whole model under full fine-tuning), and it is pinned, so copies run at full
    speed."""
    if t.device.type == "cuda":
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t.detach())  # on the host
    return t.detach().to("cpu", copy=True)


def right_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of right-padded sequences."""
    width = max(map(len, seqs))
    ids = on_device([s + [pad_id] * (width - len(s)) for s in seqs], device)
    mask = on_device([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device)
    return ids, mask
