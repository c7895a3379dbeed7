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
"""

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from emorec.batches import row_batches, token_batches
from emorec.fast.head import HeadAt
from emorec.fast.merge import can_merge, merged_adapter
from emorec.fast.packed import Packed, can_pack
from emorec.fast.prefix import PrefixCache, can_share_prefix
from emorec.fast.streams import Streamed, draws_random
from emorec.reference import Reference
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
    chosen: dict


def dispatch_packed(model, fast: Fast, head: HeadAt):
    if fast.share_prefix and fast.pack and fast.head_at and can_pack(model):
        return "packed pass", Packed(model, head, PrefixCache(head))
    return None


def dispatch_prefix_cache(model, fast: Fast, head: HeadAt):
    if fast.head_at and fast.share_prefix and can_share_prefix(model):
        return "prefix cache", PrefixCache(head)
    return None


def dispatch_head_at(model, fast: Fast, head: HeadAt):
    return ("head at positions", PrefixCache(head, share=False)) if fast.head_at else None


def dispatch_reference(model, fast: Fast, head: HeadAt):
    return "reference", Reference()


ANSWERS = [dispatch_packed, dispatch_prefix_cache, dispatch_head_at, dispatch_reference]


def answer_components(model, fast: Fast):
    """(name, component) of each answer component that could serve `model`, in dispatch order,
    built as they are asked for (dispatch takes the first; the tests compare each with the
    reference)."""
    head = HeadAt(model)
    return (found for d in ANSWERS if (found := d(model, fast, head)))


def candidates(model, fast: Fast = Fast()) -> list[tuple[str, object]]:
    return list(answer_components(model, fast))


def dispatch(model, fast: Fast, device: torch.device) -> Engine:
    """The components for `model` (after its adapter) on `device`. Thread streams are a CPU
    lever: on a GPU they would serialise on one CUDA stream."""
    name, answers = next(answer_components(model, fast))
    cpu = device.type == "cpu"
    merge = fast.merge_adapter and can_merge(model)
    engine = Engine(
        answers=answers,
        eval_batches=token_batches if fast.token_batches else row_batches,
        eval_streams=fast.eval_streams if cpu else 1,
        merge=merged_adapter if merge else lambda model: nullcontext(),
        train_streams=fast.train_streams if cpu else 1,
        chosen={"answers": name, "merged adapter": merge, "token batches": fast.token_batches},
    )
    engine.chosen.update({"eval streams": engine.eval_streams, "train streams": engine.train_streams})
    return engine


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
