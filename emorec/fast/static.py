"""The static training step: the packed pass at a few fixed lengths, with no host work inside,
so it can be compiled once per length and captured in a CUDA graph.

A GPU step of a 7B model is launch-bound, not matmul-bound: thousands of small kernels, each
costing host time, and a new attention plan for every new batch length. So here:
- a pass is one sequence: the task's shared prefix, then its rows one after the other, no
  padding between them, then padding up to its bucket's length (emorec.fast.buckets); each row
  has `slots` answer positions (the longest answer's; unused ones, and rows a short pass lacks,
  weigh 0);
- everything that depends on the batch's values (token ids, positions, which row each token
  belongs to, the positions whose logits are needed, targets, weights) is made on the host
  before the step and copied in one go (`prepare`);
- the step (`step_loss`) only reads tensors: no `.item()`, no data-dependent shapes; it builds
  the attention's mask from the row ids (causal, each token seeing the prefix and its own row),
  once for all layers, as a dense mask for SDPA or a block mask for FlexAttention; the LM head
  runs at the answer positions only, through the model's own `logits_to_keep`;
- compiled, it is one graph per bucket: of one decoder layer that every layer runs
  (`CompiledLayers`), or of the whole step (`CompiledStep`), captured in a CUDA graph on a GPU.
"""

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from emorec.fast.buckets import Buckets
from emorec.fast.packed import Packed, PackedAttention, Packing, packed_flex_attention, packed_sdpa_attention
from emorec.reference import target_logp
from emorec.tensors import base_of

log = logging.getLogger(__name__)


class StepInputs(NamedTuple):
    """A pass's values, on the device: `ids` and `positions` (1, length), the packed sequence
    and each token's position in its own prompt; `row` (length,), each token's row (-1: the
    prefix; the rows' count: padding); `at` (rows x slots,), the positions whose logits
    predict an answer slot; `target`, the slot's token; `weight`, the example's weight over the
    pass's real rows (0: an unused slot or a row the pass lacks)."""

    ids: torch.Tensor
    positions: torch.Tensor
    row: torch.Tensor
    at: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor


def prepare(prompts, answers, weights, pad_id: int, buckets: Buckets, device) -> StepInputs:
    """The StepInputs of a pass, from token lists: the host's part of a step. `weights`: a host
    tensor or list of the examples' weights (None: 1)."""
    n, rows, k = len(buckets.prefix), max(buckets.rows, len(prompts)), buckets.slots
    ids, positions, row = list(buckets.prefix), list(range(n)), [-1] * n
    at, target, weight = [], [], []
    scale = [1.0] * len(prompts) if weights is None else list(map(float, weights))
    for r in range(rows):
        seq, answer = (prompts[r][n:] + answers[r], answers[r]) if r < len(prompts) else ([], [])
        first = len(ids) + len(seq) - len(answer) - 1  # the position that predicts the answer's first token
        ids += seq
        positions += range(n, n + len(seq))
        row += [r] * len(seq)
        for j in range(k):
            used = j < len(answer)
            at.append(first + j if used else 0)
            target.append(answer[j] if used else pad_id)
            weight.append(scale[r] / len(prompts) if used else 0.0)
    pad = buckets.length(len(ids)) - len(ids)
    ids, positions, row = ids + [pad_id] * pad, positions + [0] * pad, row + [rows] * pad
    longs = torch.tensor([*ids, *positions, *row, *at, *target])  # on the host, then copied in one go
    floats = torch.tensor(weight)  # on the host
    if device.type == "cuda":  # one asynchronous copy each, from pinned memory
        longs, floats = longs.pin_memory(), floats.pin_memory()
    longs, floats = longs.to(device, non_blocking=True), floats.to(device, non_blocking=True)
    t, s = len(ids), rows * k
    ids, positions, row, at, target = longs.split([t, t, t, s, s])
    return StepInputs(ids[None], positions[None], row, at, target, floats)


def row_mask(row: torch.Tensor):
    """The pass's attention as a FlexAttention mask_mod: causal, each token seeing the prefix
    (row -1) and its own row."""

    def mask_mod(batch, head, query, key):
        return (key <= query) & ((row[key] == -1) | (row[key] == row[query]))

    return mask_mod


def dense_mask(row: torch.Tensor) -> torch.Tensor:
    """row_mask as a (length, length) boolean mask, True where a token attends."""
    at = torch.arange(len(row), device=row.device)
    return (at[None] <= at[:, None]) & ((row[None] == -1) | (row[None] == row[:, None]))


def flex_mask(row: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(row_mask(row), None, None, len(row), len(row), device=row.device)


# The pass's attention per kind, as (attention function, its mask from the row ids): fused SDPA
# with a dense mask (eager, any device), FlexAttention with a block mask (compiled, a GPU).
ATTENTION = {"sdpa": (packed_sdpa_attention, dense_mask), "flex": (packed_flex_attention, flex_mask)}


def step_loss(model, inputs: StepInputs, mask: Callable, smoothing: float = 0.0) -> torch.Tensor:
    """The pass's loss (its examples' weighted mean answer NLL, as reference.answer_loss): reads
    tensors only. `mask`: a mask builder of ATTENTION, run once for all layers; `smoothing`:
    reference.target_logp's (a constant of the run, so one compiled graph serves it)."""
    packing = Packing(0, 0, mask=mask(inputs.row))
    logits = model(
        input_ids=inputs.ids,
        position_ids=inputs.positions,
        logits_to_keep=inputs.at,
        packed=packing,
        use_cache=False,  # a cache would copy every layer's keys and values
    ).logits
    logp = target_logp(logits[0], inputs.target, smoothing)
    return -(logp * inputs.weight).sum()


class CompiledStep:
    """step_loss through torch.compile as one graph per bucket (dynamic=False: lengths are few
    and fixed, each its own specialised graph), the recompile limit raised to the buckets for
    this step's calls only. `mode`: "reduce-overhead" adds CUDA graphs, whose outputs the next
    replay overwrites, so the loss leaves as a copy."""

    def __init__(self, step: Callable, mode: str | None, shapes: int, backend="inductor"):
        self.compiled = torch.compile(step, dynamic=False, mode=mode, backend=backend)
        self.graphs, self.limit = mode == "reduce-overhead", max(8, shapes + 2)

    def __call__(self, *args) -> torch.Tensor:
        with torch._dynamo.config.patch(recompile_limit=self.limit):
            if self.graphs:
                torch.compiler.cudagraph_mark_step_begin()
            loss = self.compiled(*args)
        return loss.clone() if self.graphs else loss


def decoder_layers(model) -> list[torch.nn.Module] | None:
    """The model's decoder layers (transformers' decoders keep them in `layers`), or None."""
    base = base_of(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


class CompiledLayers:
    """step_loss with its decoder layers compiled (regional compilation): one compiled function
    that every layer runs, so a bucket compiles one layer's graph, not the whole model's (the
    layers differ in their weights only, which torch.compile takes as inputs). The embedding,
    the mask, the head and the loss stay eager: a few ops per step. The layers run compiled
    inside the step only (`_compiled_call_impl`, as nn.Module.compile sets it, for the step's
    duration): evaluation, at shapes of its own, runs them eagerly."""

    def __init__(
        self, step: Callable, layers: list[torch.nn.Module], mode: str | None, shapes: int, backend="inductor"
    ):
        self.step, self.layers = step, layers
        self.compiled = [torch.compile(layer._call_impl, dynamic=False, mode=mode, backend=backend) for layer in layers]
        self.limit = max(8, shapes + 2)

    def __call__(self, model, *args) -> torch.Tensor:
        # The first layer's input would need no gradient (a frozen embedding's output), which
        # makes its graph one of its own: asking for one costs a part of that layer's backward,
        # and halves what each bucket compiles.
        embedding = base_of(model).get_input_embeddings()
        hook = embedding.register_forward_hook(lambda module, inputs, out: out.requires_grad_(torch.is_grad_enabled()))
        with torch._dynamo.config.patch(recompile_limit=self.limit):
            for layer, compiled in zip(self.layers, self.compiled):
                layer._compiled_call_impl = compiled
            try:
                return self.step(model, *args)
            finally:
                hook.remove()
                for layer in self.layers:
                    layer._compiled_call_impl = None


def compiled_step(model, compiled: tuple, shapes: int) -> Callable:
    """step_loss compiled at `scope` ("layer": CompiledLayers, where the model's layers are
    found; "step": CompiledStep) in torch.compile's `mode`."""
    scope, mode = compiled
    layers = decoder_layers(model) if scope == "layer" else None
    if layers is not None:
        return CompiledLayers(step_loss, layers, mode, shapes)
    return CompiledStep(step_loss, mode, shapes)


def takes_logits_to_keep(model) -> bool:
    """Whether the model's forward computes its head at given positions (`logits_to_keep`, as
    transformers' causal LMs do), which the static step needs."""
    base = base_of(model)
    return "logits_to_keep" in inspect.signature(base.forward).parameters


class StaticPacked:
    """The answer loss of training passes (whose prompts all start with `buckets.prefix`) through
    the static step, at `buckets`' lengths; scores through `packed`. `attention`: a key of
    ATTENTION; `compiled`: (scope, torch.compile's mode) or None (eager), see compiled_step. The
    examples' weights come on the host (`host_inputs`), as the step's other values."""

    host_inputs = True

    def __init__(self, model, packed: Packed, buckets: Buckets, attention: str, compiled: tuple | None, chosen=None):
        self.packed, self.buckets, self.chosen = packed, buckets, {} if chosen is None else chosen
        self.model = model
        self.eager(attention)
        self.device = next(model.parameters()).device
        if compiled:
            self.step = compiled_step(model, compiled, len(buckets.lengths))

    def eager(self, attention: str) -> None:
        function, self.mask = ATTENTION[attention]
        self.attention, self.step = PackedAttention(self.model, function), step_loss

    def compile_failed(self, error: Exception) -> None:
        """A compiler's failure costs speed, not the run: the step runs eagerly from here on (with
        SDPA: eager FlexAttention materialises its scores), and metrics.json says so."""
        log.warning("torch.compile failed (%s); the static step runs eagerly (fast.compile=false skips it)", error)
        self.eager("sdpa")
        self.chosen["compile"] = f"off: compiling failed ({type(error).__name__})"

    def shared_length(self, model, prompts: list[list[int]]) -> int:
        return len(self.buckets.prefix)  # the training prompts' common prefix (Engine.for_training)

    def loss(self, model, prompts, answers, pad_id: int, weights=None, smoothing: float = 0.0) -> torch.Tensor:
        inputs = prepare(prompts, answers, weights, pad_id, self.buckets, self.device)
        try:
            with self.attention.packed():
                return self.step(model, inputs, self.mask, smoothing)
        except torch._dynamo.exc.TorchDynamoException as error:  # compiling, before any of the step ran
            if self.step is step_loss:
                raise
            self.compile_failed(error)
        with self.attention.packed():
            return self.step(model, inputs, self.mask, smoothing)

    def open(self, model, prompts: list[list[int]]):
        return self.packed.open(model, prompts)

    def scores(self, model, prompts, answers, pad_id: int, first_token: bool, prefix=None):
        return self.packed.scores(model, prompts, answers, pad_id, first_token, prefix)


@dataclass(frozen=True)
class Static:
    """How the static training step runs: its attention (a key of static.ATTENTION), how it is
    compiled ((scope, torch.compile's mode), or None: eagerly), the buckets' count and multiple."""

    attention: str
    compiled: tuple | None
    most: int
    multiple: int


def compiling(fast, device: torch.device) -> tuple | None:
    """(scope, torch.compile's mode) of the static step, or None (eager). auto: on a GPU only: a
    GPU step is launch-bound and compiling fuses it; a CPU step is matmul-bound
    (experiments/compile). Scope "layer" (regional compilation) compiles one decoder layer's
    graph per bucket, in seconds; "step" the whole step's, in minutes, and on a GPU captures it
    in a CUDA graph (mode "reduce-overhead"), which removes the launches left."""
    if fast.compile == "false" or (fast.compile == "auto" and device.type != "cuda"):
        return None
    graphs = fast.compile_scope == "step" and device.type == "cuda"
    return fast.compile_scope, "reduce-overhead" if graphs else None


def dispatch_static(model, fast, device: torch.device, packs: bool) -> Static | None:
    """The static step where `fast` (the fast config group) asks for it (static_shapes; auto:
    where compiled or on a GPU) and it can serve: the packed pass (`packs`), a head that takes
    `logits_to_keep`. Its attention: FlexAttention compiled on a GPU, else fused SDPA with a
    dense mask."""
    compiled = compiling(fast, device)
    wanted = fast.static_shapes == "true" or (fast.static_shapes == "auto" and (device.type == "cuda" or compiled))
    if not (wanted and packs and takes_logits_to_keep(model)):
        return None
    attention = "flex" if compiled and device.type == "cuda" else "sdpa"
    return Static(attention, compiled, fast.buckets, fast.bucket_multiple)
