"""emorec's speed components, and the one place that says which serves a run.

Each component computes what `emorec.reference` computes, faster, for some models, adapters or
devices. `dispatch` chooses once, at setup, from the `fast` config group: for each concern its
dispatch_* functions are tried in order, the first that answers wins, and the plain path comes
last. `fast=off` is the reference path everywhere.

- answer loss and label scores: packed pass (packed.py), prefix cache (prefix.py), LM head at
  the needed positions only (prefix.py without a prefix), reference;
- a training step's backward: data parallel (train.py), thread streams (streams.py), one pass
  (train.py);
- evaluation: merged adapter (merge.py), token-budget batches (batches.py), thread streams
  (streams.py), each or the plain way.

Some choices are per device, made at setup from the device alone: the attention kernel the model
loads with (`dispatch_attention`), the packed pass's attention (fused SDPA on a GPU), thread
streams (CPU only), token budgets sized to the device's memory (`token_budgets`), a fused
optimizer on a GPU (`optimizer_options`).
"""

import importlib.util
import inspect
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch

from emorec.batches import row_batches, token_batches
from emorec.fast.head import HeadAt
from emorec.fast.merge import can_merge, merged_adapter
from emorec.fast.packed import Packed, can_pack
from emorec.fast.prefix import PrefixCache, can_share_prefix
from emorec.fast.streams import Streamed, draws_random
from emorec.reference import Reference, base_of
from emorec.train import DataParallel, OnePass, Passes


@dataclass(frozen=True)
class Fast:
    """The `fast` config group: which components a run may use (each exact up to rounding);
    dispatch decides where each applies."""

    share_prefix: bool = True  # the prompts' shared first tokens run once per batch
    pack: bool = True  # ... inside the rows' own pass (packed attention)
    head_at: bool = True  # the LM head only at the positions the loss or the scores need
    bf16_base: bool = True  # with bf16: a frozen base stored in bf16 (see run.build_model)
    merge_adapter: bool = True  # LoRA/DoRA/IA3 folded into the weights while predicting
    token_batches: bool = True  # evaluation batches cut by tokens, not rows
    eval_streams: int = 1  # evaluation batches in this many threads at once (CPU)
    train_streams: int = 1  # training passes as this many pieces in threads (CPU)


@dataclass
class Engine:
    """The components chosen for one run."""

    answers: object  # loss, scores, open, shared_length: Packed, PrefixCache or Reference
    eval_batches: Callable[[list[int], int], list[list[int]]]
    eval_streams: int
    merge: Callable  # model -> context manager
    train_streams: int
    max_pass_tokens: int | None  # a training pass's padded tokens (batches.passes)
    chosen: dict


def packs(model, fast: Fast) -> bool:
    return fast.share_prefix and fast.pack and fast.head_at and can_pack(model)


def dispatch_packed_fused(model, fast: Fast, head: HeadAt, device: torch.device):
    if device.type == "cuda" and packs(model, fast):
        return "packed pass (SDPA)", Packed(model, head, PrefixCache(head), fused=True)
    return None


def dispatch_packed(model, fast: Fast, head: HeadAt, device: torch.device):
    return ("packed pass", Packed(model, head, PrefixCache(head))) if packs(model, fast) else None


def dispatch_prefix_cache(model, fast: Fast, head: HeadAt, device: torch.device):
    if fast.head_at and fast.share_prefix and can_share_prefix(model):
        return "prefix cache", PrefixCache(head)
    return None


def dispatch_head_at(model, fast: Fast, head: HeadAt, device: torch.device):
    return ("head at positions", PrefixCache(head, share=False)) if fast.head_at else None


def dispatch_reference(model, fast: Fast, head: HeadAt, device: torch.device):
    return "reference", Reference()


ANSWERS = [dispatch_packed_fused, dispatch_packed, dispatch_prefix_cache, dispatch_head_at, dispatch_reference]


def answer_components(model, fast: Fast, device: torch.device):
    """(name, component) of each answer component that could serve `model` on `device`, in
    dispatch order, built as they are asked for (dispatch takes the first; the tests compare
    each with the reference)."""
    head = HeadAt(model)
    return (found for d in ANSWERS if (found := d(model, fast, head, device)))


def candidates(model, fast: Fast = Fast()) -> list[tuple[str, object]]:
    """Every answer component for `model`, those of a GPU too (each runs on any device)."""
    return list(answer_components(model, fast, torch.device("cuda")))


def dispatch_attention(requested: str | None, device: torch.device, dtype: torch.dtype) -> str | None:
    """The attention kernel a model loads with. `auto`: flash_attention_2 on a GPU where the
    flash-attn package is installed (bf16/fp16 only), else SDPA there; eager on a CPU, whose
    plain matmuls beat SDPA's CPU kernels at emorec's short prompts (its backward is slow:
    experiments/bench/README.md). Anything else is the user's choice and stays."""
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "eager"
    if dtype in (torch.bfloat16, torch.float16) and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


# Activation bytes a trained token keeps for the backward, per layer and hidden unit, in bf16
# with a fused attention kernel (Korthikanti et al. 2022, "Reducing activation recomputation",
# eq. 1 without the attention-score term); an evaluated token keeps nothing after its layer.
TRAIN_BYTES, EVAL_BYTES, MOST_TOKENS = 34, 8, 65536


def token_budgets(model, device: torch.device, max_pass_tokens) -> tuple[int | None, int | None]:
    """(a training pass's, an evaluation batch's) most padded tokens. On a CPU: max_pass_tokens
    (auto: 1024) and None (eval_batch_size rows of the mean length). On a GPU: what half of its
    free memory holds (the rest for the allocator's slack and the optimizer's states), so a
    large GPU runs large passes and a small one still fits; max_pass_tokens, when set, wins."""
    if device.type != "cuda":
        return (1024 if max_pass_tokens == "auto" else max_pass_tokens), None
    config = base_of(model).config
    config = getattr(config, "text_config", config)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None)  # GLM: num_layers
    hidden = getattr(config, "hidden_size", None)
    if not (layers and hidden):
        return (4096 if max_pass_tokens == "auto" else max_pass_tokens), 16384
    per_token = layers * hidden * next(model.parameters()).element_size() // 2
    free = torch.cuda.mem_get_info(device)[0] // 2
    train = min(MOST_TOKENS, max(1024, free // (TRAIN_BYTES * per_token)))
    evaluate = min(MOST_TOKENS, max(4096, free // (EVAL_BYTES * per_token)))
    return (train if max_pass_tokens == "auto" else max_pass_tokens), evaluate


def optimizer_options(make_optimizer, device: torch.device) -> dict:
    """Keyword arguments for the optimizer on `device`: on a GPU, the fused CUDA kernel
    (torch.optim's Adam, AdamW, SGD) where the optimizer has one and the config left it unset:
    one launch per step instead of several per parameter."""
    target = getattr(make_optimizer, "func", make_optimizer)
    keywords = getattr(make_optimizer, "keywords", {})
    try:
        takes_fused = "fused" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {}
    return {"fused": True} if device.type == "cuda" and takes_fused and "fused" not in keywords else {}


def dispatch(model, fast: Fast, device: torch.device, max_pass_tokens="auto") -> Engine:
    """The components for `model` (after its adapter) on `device`. Thread streams are a CPU
    lever: on a GPU they would serialise on one CUDA stream."""
    name, answers = next(answer_components(model, fast, device))
    cpu = device.type == "cpu"
    merge = fast.merge_adapter and can_merge(model)
    pass_tokens, eval_tokens = token_budgets(model, device, max_pass_tokens)
    eval_streams, train_streams = (fast.eval_streams, fast.train_streams) if cpu else (1, 1)
    return Engine(
        answers=answers,
        eval_batches=partial(token_batches, max_tokens=eval_tokens) if fast.token_batches else row_batches,
        eval_streams=eval_streams,
        merge=merged_adapter if merge else lambda model: nullcontext(),
        train_streams=train_streams,
        max_pass_tokens=pass_tokens,
        chosen={
            "answers": name,
            "merged adapter": merge,
            "token batches": fast.token_batches,
            "eval streams": eval_streams,
            "train streams": train_streams,
            "max pass tokens": pass_tokens,
            "eval batch tokens": eval_tokens,
        },
    )


def dispatch_backward(model, passes: Passes, streams: int, accelerator=None) -> OnePass:
    """How a training step's passes run: several processes; thread streams (one per intra-op
    thread at most, and not with dropout, whose masks several threads would draw in whichever
    order they reach them); one pass after another."""
    if accelerator is not None:
        return DataParallel(passes, accelerator, model)
    streams = min(streams, torch.get_num_threads())
    if streams > 1 and not draws_random(model):
        return Streamed(passes, [p for p in model.parameters() if p.requires_grad], streams)
    return OnePass(passes)
