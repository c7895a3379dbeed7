"""emorec's speed components, and the one place that says which serves a run: the per-device
plan.

Each component computes what `emorec.reference` computes, faster, for some models, adapters or
devices. The plan is made in two steps from the `fast` config group and the device:
`plan_load`, before the model loads (the frozen base's dtype, the attention kernel, PEFT's input
casts), and `dispatch`, after it (the Engine: answer component, streams, batching, and the
backward strategy once the training passes exist). For each concern its dispatch_* functions
are tried in order, the first that answers wins, and the plain path comes last. The Engine
records what was built (`chosen`, written to metrics.json). `fast=off` is the reference path
everywhere.

- answer loss and label scores: packed pass (packed.py), prefix cache (prefix.py), LM head at
  the needed positions only (prefix.py without a prefix), reference;
- a training step's backward: sharded (emorec.sharded), data parallel (emorec.distributed),
  thread streams (streams.py), one pass (emorec.train);
- a training pass: the static step (static.py: a few fixed lengths, buckets.py; no host work;
  compiled per decoder layer or whole), or the answer component's own loss;
- fused kernels where a GPU step runs eagerly (kernels.py: Liger Kernel);
- evaluation: merged adapter (merge.py), token-budget batches (batches.py), thread streams
  (streams.py), each or the plain way.

Some choices are per device, made at setup from the device alone: bf16 autocast under
trainer.precision=auto (`use_bf16`), the attention kernel the model loads with
(`dispatch_attention`), the packed pass's attention (fused SDPA on a GPU), the static step and
torch.compile (on a GPU; FlexAttention there when compiled), thread streams (CPU only), token
budgets sized to the device's memory (`token_budgets`), a fused optimizer on a GPU
(`optimizer_options`).
"""

import importlib.util
import inspect
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Protocol

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from emorec.batches import row_batches, token_batches
from emorec.distributed import DataParallel
from emorec.env import cpu_computes_bf16
from emorec.errors import EmorecError
from emorec.fast.buckets import plan_buckets
from emorec.fast.kernels import dispatch_kernels
from emorec.fast.lm_head import HeadAt
from emorec.fast.merge import can_merge, merged_adapter
from emorec.fast.packed import Packed, can_pack
from emorec.fast.prefix import PrefixCache, can_share_prefix, common_prefix
from emorec.fast.static import Static, StaticPacked, dispatch_static
from emorec.fast.streams import Streamed, draws_random
from emorec.reference import Reference
from emorec.sharded import Sharded, is_sharded
from emorec.tensors import base_of, recomputes_activations
from emorec.train import OnePass, Passes


@dataclass  # not frozen: Hydra's schema of the group, whose nodes must take overrides
class Fast:
    """The `fast` config group and its schema (emorec.schema): which components a run may use
    (each exact up to rounding); dispatch decides where each applies."""

    share_prefix: bool = True  # the prompts' shared first tokens run once per batch
    pack: bool = True  # ... inside the rows' own pass (packed attention)
    head_at: bool = True  # the LM head only at the positions the loss or the scores need
    bf16_base: bool = True  # with bf16: a frozen base stored in bf16 (see plan_load)
    bf16_adapter_inputs: bool = True  # with bf16: an adapter's input stays bf16 (see plan_load)
    merge_adapter: bool = True  # LoRA/DoRA/IA3 folded into the weights while predicting
    token_batches: bool = True  # evaluation batches cut by tokens, not rows
    eval_streams: int = 1  # evaluation batches in this many threads at once (CPU)
    train_streams: int = 1  # training passes as this many pieces in threads (CPU)
    static_shapes: str = "auto"  # training passes at a few fixed shapes (static.py); auto: where compiled or on a GPU
    compile: str = "auto"  # torch.compile the static step, once per bucket; auto: on a GPU
    compile_scope: str = "layer"  # layer: one decoder layer's graph, run by all; step: the whole step (+ CUDA graphs)
    buckets: int = 8  # lengths chosen for static passes, and one for the longest possible (buckets.py)
    bucket_multiple: int = 8  # each a multiple of this
    fused_kernels: bool = True  # Liger Kernel's RMSNorm and SwiGLU on a GPU where the step runs eagerly

    def __post_init__(self):
        for name in ("eval_streams", "train_streams", "buckets", "bucket_multiple"):
            if not getattr(self, name) > 0:
                raise EmorecError(f"fast.{name}={getattr(self, name)!r} is not valid; it must be a positive integer")
        for name in ("static_shapes", "compile"):
            value = str(getattr(self, name)).lower()
            if value not in ("auto", "true", "false"):
                raise EmorecError(f"fast.{name}={getattr(self, name)!r} is not valid; use auto, true or false")
            setattr(self, name, value)
        if self.compile == "true" and self.static_shapes == "false":
            raise EmorecError("fast.compile=true compiles the static step; set fast.static_shapes=auto or true")
        if self.compile_scope not in ("layer", "step"):
            raise EmorecError(f"fast.compile_scope={self.compile_scope!r} is not valid; use layer or step")


class AnswerComponent(Protocol):
    """What computes a causal LM's answer loss and label scores: Packed, PrefixCache or
    reference.Reference, each the same quantities up to rounding."""

    def shared_length(self, model, prompts: list[list[int]]) -> int:
        """The tokens a pass of these prompts runs once for all of them."""

    def loss(self, model, prompts, answers, pad_id: int, weights=None, smoothing: float = 0.0) -> torch.Tensor:
        """The answers' mean negative log-likelihood (reference.answer_loss)."""

    def open(self, model, prompts: list[list[int]]):
        """What a whole evaluation set shares (its prefix's cache), or None."""

    def scores(self, model, prompts, answers, pad_id: int, first_token: bool, prefix=None) -> torch.Tensor:
        """(batch, labels) log-likelihoods (reference.score_labels)."""


class Backward(Protocol):
    """How a training step's forward and backward passes run (OnePass, Streamed, DataParallel)."""

    passes: Passes
    rank: int
    world: int

    def step(self, batches: list[list[int]], progress) -> torch.Tensor: ...

    def agree(self, values: torch.Tensor) -> torch.Tensor: ...

    def barrier(self) -> None: ...


@dataclass(frozen=True)
class LoadPlan:
    """How the model loads on this device, chosen before it loads."""

    dtype: torch.dtype  # of the loaded weights
    input_casts: bool  # PEFT casts each adapter's input to the adapter's dtype
    device: torch.device

    def attention(self, requested: str | None) -> str | None:
        return dispatch_attention(requested, self.device, self.dtype)

    def describe(self) -> dict:
        return {"base dtype": str(self.dtype).removeprefix("torch."), "adapter input casts": self.input_casts}


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast where the hardware computes bf16 natively (tensor cores from Ampere, compute
    capability 8.0, on; AVX-512 BF16/AMX on CPUs): elsewhere it is emulated and slower than
    fp32 (torch.cuda.is_bf16_supported() counts emulation on a V100 or T4 as support, oneDNN's
    check AVX-512 without BF16)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and cpu_computes_bf16()


def plan_load(fast: Fast, device: torch.device, bf16: bool, trains_base: bool) -> LoadPlan:
    """A frozen base is stored in bf16 under bf16 autocast: autocast would otherwise cast every
    weight at every forward (15 % of a training step here), and it halves the memory. Weights
    that train stay fp32 (PEFT keeps adapter weights fp32, emorec.classifier makes a decoder's
    head fp32), so optimizer updates are not rounded away: a base that trains (full fine-tuning;
    an encoder, whose new head PEFT copies in the base's dtype) loads in fp32.
    PEFT casts each adapter's input to the adapter's fp32 weights, and autocast casts it back:
    two copies per adapter call (8 % of a step here). Every forward of a run is under autocast,
    so the input can stay bf16 (as with PEFT's helpers.disable_input_dtype_casting)."""
    dtype = torch.bfloat16 if bf16 and fast.bf16_base and not trains_base else torch.float32
    return LoadPlan(dtype, not (bf16 and fast.bf16_adapter_inputs), device)


def apply_input_casts(model, plan: LoadPlan) -> None:
    """Turn PEFT's adapter input casts off where the plan says so (see plan_load)."""
    if not plan.input_casts:
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False


@dataclass
class Engine:
    """The components chosen for one run, and (`chosen`) what was built."""

    answers: AnswerComponent
    eval_batches: Callable[[list[int], int], list[list[int]]]
    eval_streams: int
    merge: Callable  # model -> context manager
    train_streams: int
    max_pass_tokens: int | None  # a training pass's padded tokens (batches.passes)
    chosen: dict
    static: "Static | None" = None  # the static training step, where it serves (dispatch_static)

    def for_task(self, task) -> "Engine":
        """The engine as the task can use it: generation keeps one evaluation stream."""
        if task.streams:
            return self
        return replace(self, eval_streams=1, chosen={**self.chosen, "eval streams": 1})

    def for_training(self, task, model, prompts: list[list[int]], targets: list[int], batch_size: int):
        """The task as training runs it: with the static step, its loss at the training set's
        shape buckets (its prompts' common prefix, lengths from its passes; `batch_size`: this
        process's rows of a batch), compiled where the plan says; else the task as it is."""
        answers = getattr(task, "answers", None)
        if self.static is None or answers is None or not isinstance(task.impl, Packed):
            return task
        n = common_prefix(prompts)
        if n == 0:
            self.chosen["static step"] = "off: the training prompts share no prefix"
            return task
        lengths = task.lengths(prompts, targets)
        options = (self.static.most, self.static.multiple, self.max_pass_tokens)
        buckets = plan_buckets(lengths, prompts[0][:n], [len(answers[t]) for t in set(targets)], batch_size, options)
        impl = StaticPacked(model, task.impl, buckets, self.static.attention, self.static.compiled, self.chosen)
        self.chosen["static step"] = {"attention": self.static.attention, **buckets.describe()}
        return task.with_impl(impl)

    def backward(self, model, passes: Passes, accelerator=None) -> Backward:
        """The training step's backward strategy (dispatch_backward), recorded in `chosen`."""
        name, strategy = dispatch_backward(model, passes, self.train_streams, accelerator)
        self.chosen["backward"] = name
        return strategy


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


def candidates(model, fast: Fast | None = None) -> list[tuple[str, object]]:
    """Every answer component for `model`, those of a GPU too (each runs on any device)."""
    return list(answer_components(model, fast or Fast(), torch.device("cuda")))


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


class PlainTraining:
    """An answer component whose training loss takes the plain pass (reference.Reference), for a
    model under activation checkpointing: its layers recompute in the backward pass, outside
    whatever the fast pass switched on for its forward (the packed attention, a cached prefix),
    and must see the model as loaded. Evaluation has no backward and keeps the fast component."""

    def __init__(self, fast_component):
        self.fast, self.plain = fast_component, Reference()

    def loss(self, model, prompts, answers, pad_id: int, weights=None, smoothing: float = 0.0) -> torch.Tensor:
        return self.plain.loss(model, prompts, answers, pad_id, weights, smoothing)

    def shared_length(self, model, prompts: list[list[int]]) -> int:
        return self.plain.shared_length(model, prompts)

    def __getattr__(self, name: str):
        return getattr(self.fast, name)


def dispatch(model, fast: Fast, device: torch.device, max_pass_tokens="auto", processes: int = 1) -> Engine:
    """The components for `model` (after its adapter) on `device`, in a run of `processes`.
    Thread streams are a CPU lever (on a GPU they would serialise on one CUDA stream), one per
    intra-op thread at most; training keeps one stream with several processes and with dropout,
    whose masks several threads would draw in whichever order they reach them."""
    sharded = is_sharded(model)
    # Under sharding every forward is a collective: a training pass must run one forward whatever
    # its rows (the prefix cache runs a second for the prefix when the rows share one).
    name, answers = next(
        (n, a) for n, a in answer_components(model, fast, device) if not (sharded and isinstance(a, PrefixCache))
    )
    recomputes = recomputes_activations(model)
    if recomputes and not isinstance(answers, Reference):
        name, answers = f"{name} (training: reference, as activations are recomputed)", PlainTraining(answers)
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    # Sharded weights cannot fold an adapter in (each process holds a slice), and collectives
    # from several threads would interleave: one stream, no static step (its own forward).
    merge = fast.merge_adapter and can_merge(model) and not sharded
    pass_tokens, eval_tokens = token_budgets(model, device, max_pass_tokens)
    eval_streams = 1 if sharded else min(fast.eval_streams, threads)
    static = None if recomputes or sharded else dispatch_static(model, fast, device, packs(model, fast))
    kernels = dispatch_kernels(model, fast, device, static)
    # A static pass runs whole: streams would cut it into pieces of other shapes.
    one_stream = processes > 1 or sharded or draws_random(model) or static is not None
    train_streams = 1 if one_stream else min(fast.train_streams, threads)
    return Engine(
        answers=answers,
        eval_batches=partial(token_batches, max_tokens=eval_tokens) if fast.token_batches else row_batches,
        eval_streams=eval_streams,
        merge=merged_adapter if merge else lambda model: nullcontext(),
        train_streams=train_streams,
        max_pass_tokens=pass_tokens,
        chosen={
            "answers": name,
            "merged adapter": "off: the weights are sharded" if sharded and fast.merge_adapter else merge,
            "token batches": fast.token_batches,
            "eval streams": eval_streams,
            "train streams": train_streams,
            "max pass tokens": pass_tokens,
            "eval batch tokens": eval_tokens,
            "static step": "on" if static else "off",
            "compile": f"{static.compiled[0]} ({static.compiled[1] or 'default'})"
            if static and static.compiled
            else "off",
            "fused kernels": kernels,
        },
        static=static,
    )


def dispatch_backward(model, passes: Passes, streams: int, accelerator=None) -> tuple[str, Backward]:
    """(name, strategy) of how a training step's passes run: several processes; thread streams
    (`streams`, as dispatch chose them); one pass after another."""
    if is_sharded(model):
        return "fully sharded (FSDP2)", Sharded(passes, model)
    if accelerator is not None:
        return "data parallel", DataParallel(passes, accelerator, model)
    if streams > 1:
        return "streams", Streamed(passes, [p for p in model.parameters() if p.requires_grad], streams)
    return "one pass", OnePass(passes)
