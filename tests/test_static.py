"""The static training step (emorec.fast.static) and its shape buckets (emorec.fast.buckets):
the same loss and gradients as the reference, few shapes, no host work inside a step, one op
sequence per bucket, no graph breaks, one compile per bucket, and an op budget per layer."""

import itertools
from collections import Counter
from functools import partial

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from emorec import reference
from emorec.errors import EmorecError
from emorec.fast import Fast, apply_input_casts, dispatch, plan_load
from emorec.fast.buckets import Buckets, choose_lengths, plan_buckets
from emorec.fast.static import (
    ATTENTION,
    CompiledLayers,
    CompiledStep,
    StaticPacked,
    decoder_layers,
    prepare,
    step_loss,
)
from emorec.tasks import LabelWords
from experiments.compile.ops import per_layer
from tests.test_engine import DEVICES, lora_model

# Rows sharing the prefix [5, 9, 30], of different lengths; answers of 1-4 tokens.
PROMPTS = [[5, 9, 30, 41, 7, 8], [5, 9, 30, 12, 13], [5, 9, 30, 41, 3, 4, 6, 10, 11], [5, 9, 30, 7]]
ANSWERS = [[20, 2], [23, 24, 25, 2], [21, 22, 2], [26]]
# Two more batches of the same bucket as the first two rows, other tokens and labels.
OTHER = ([[5, 9, 30, 8, 8, 8, 8], [5, 9, 30, 6]], [3, 0])


def static_task(model, device, attention=None, **fast):
    """A LabelWords task whose loss runs the static step, for PROMPTS/ANSWERS in batches of 4."""
    engine = dispatch(model, Fast(static_shapes="true", **fast), device)
    if attention:
        engine.static = type(engine.static)(attention, None, 8, 8)
    task = LabelWords(ANSWERS, ANSWERS, ["a", "b", "c", "d"], 2, True, engine.answers)
    return engine.for_training(task, model, PROMPTS, [0, 1, 2, 3], 4)


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_chosen_lengths_waste_least_and_keep_the_longest():
    passes = Counter({30: 16, 100: 16, 110: 32, 300: 16, 470: 16, 900: 5, 1020: 1})
    chosen = choose_lengths(passes, most=3, multiple=16)
    assert len(chosen) == 3 and chosen[-1] == 1024 and all(t % 16 == 0 for t in chosen)

    def waste(lengths):
        return sum(times * (min(b for b in lengths if b >= t) - t) for t, times in passes.items())

    edges = sorted({-(-t // 16) * 16 for t in passes})
    best = min(waste((*c, 1024)) for k in range(3) for c in itertools.combinations(edges[:-1], k))
    assert waste(chosen) == best  # the dynamic programme finds the exhaustive search's optimum
    assert choose_lengths(Counter({5: 1, 17: 2}), most=8) == (8, 24)
    with pytest.raises(EmorecError, match="fast.buckets"):
        choose_lengths(Counter(), most=8)


def test_buckets_hold_every_pass_drawn_and_longer_ones_run_as_they_are():
    lengths = [13 + (i * 37) % 90 for i in range(500)]
    buckets = plan_buckets(lengths, [1, 2, 3], [2, 3], 16, (4, 16, None))
    assert buckets.rows == 16 and buckets.slots == 3 and buckets.prefix == (1, 2, 3)
    # Four chosen from the passes drawn, and the longest possible: the 16 longest rows together.
    longest = 3 + sum(sorted(t - 3 for t in lengths)[-16:])
    assert len(buckets.lengths) == 5 and buckets.lengths[-1] == -(-longest // 16) * 16
    assert all(t % 16 == 0 for t in buckets.lengths)
    assert buckets.length(buckets.lengths[0] - 5) == buckets.lengths[0]
    assert buckets.length(10_000) == 10_000
    # With a token budget, passes of at most 512 padded tokens: their lengths are smaller.
    split = plan_buckets(lengths, [1, 2, 3], [2, 3], 16, (4, 16, 512))
    assert split.lengths[-1] < buckets.lengths[-1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_static_step_gives_the_reference_loss_and_gradients(tiny_model, device, smoothing):
    device = torch.device(device)
    model = lora_model(tiny_model, device=device).train()
    task = static_task(model, device)
    task.smoothing = smoothing
    assert isinstance(task.impl, StaticPacked) and task.impl.buckets.prefix == (5, 9, 30)
    expected = reference.answer_loss(model, PROMPTS, ANSWERS, 2, smoothing=smoothing)
    expected.backward()
    ref = grads(model)
    model.zero_grad()
    loss = task.loss(model, PROMPTS, [0, 1, 2, 3])
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-4)
    assert torch.allclose(grads(model), ref, atol=1e-5)
    # A short pass (2 of the 4 rows, the others empty and of weight 0) is the mean of its own.
    short = task.loss(model, PROMPTS[:2], [0, 1])
    expected = reference.answer_loss(model, PROMPTS[:2], ANSWERS[:2], 2, smoothing=smoothing)
    assert short.item() == pytest.approx(expected.item(), abs=1e-4)


def test_flex_attention_forward_matches_sdpa_and_the_packed_pass(tiny_model):
    """FlexAttention with the block mask (the compiled GPU step's attention) against SDPA with
    the dense mask and the packed pass's own attention, forward; its gradients are tested on a
    GPU (no CPU backward in torch 2.13)."""
    model = lora_model(tiny_model)
    with torch.no_grad():
        losses = {a: static_task(model, torch.device("cpu"), a).loss(model, PROMPTS, [0, 1, 2, 3]) for a in ATTENTION}
        packed = static_task(model, torch.device("cpu")).impl.packed.loss(model, PROMPTS, ANSWERS, 2)
    assert set(losses) == {"sdpa", "flex"}
    assert losses["flex"].item() == pytest.approx(packed.item(), abs=1e-5)
    assert losses["sdpa"].item() == pytest.approx(packed.item(), abs=1e-5)


# Ops whose result the host must wait for, whose output's shape depends on values, or that
# make a tensor from host values (lift_fresh: torch.tensor, a copy to a GPU that waits for it).
HOST_WORK = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item", "masked_scatter"}
HOST_WORK |= {"lift_fresh", "lift_fresh_copy"}


class NoHostWork(TorchDispatchMode):
    """Fails on an op that reads a value to the host or has a data-dependent shape; records
    every op with its output shapes."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_WORK or (name.startswith("index") and any(boolean(a) for a in args)):
            raise AssertionError(f"host work in a static step: {func}")
        out = func(*args, **(kwargs or {}))
        shapes = [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(t)]
        first = args[0].data_ptr() if args and torch.is_tensor(args[0]) else None
        self.ops.append((str(func), tuple(shapes), first))
        return out


def boolean(arg) -> bool:
    items = arg if isinstance(arg, (list, tuple)) else [arg]
    return any(torch.is_tensor(t) and t.dtype == torch.bool for t in items)


def traced_step(model, impl, prompts, answers) -> list:
    """The ops of one static step (forward and backward, under bf16 autocast), its inputs made
    before it; each op as (name, output shapes, where its first argument's data is)."""
    inputs = prepare(prompts, answers, None, 2, impl.buckets, torch.device("cpu"))
    model.zero_grad(set_to_none=True)  # as the loop leaves it after every optimizer step
    with impl.attention.packed(), NoHostWork() as mode:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = step_loss(model, inputs, impl.mask)
        loss.backward()
    return mode.ops


def run_like_model(tiny_model):
    """The tiny model with LoRA as a bf16 run loads it (emorec.fast.plan_load): a bf16 base, fp32
    adapter weights, PEFT's input casts off."""
    model = lora_model(tiny_model, dtype=torch.bfloat16).train()
    apply_input_casts(model, plan_load(Fast(), torch.device("cpu"), True, False))
    return model


def test_a_static_step_does_no_host_work_and_repeats_its_ops_within_a_bucket(tiny_model):
    model = run_like_model(tiny_model)
    task = static_task(model, torch.device("cpu"))
    first = traced_step(model, task.impl, PROMPTS[:2], ANSWERS[:2])
    other = traced_step(model, task.impl, OTHER[0], [ANSWERS[t] for t in OTHER[1]])
    assert [op[:2] for op in first] == [op[:2] for op in other] and len(first) > 100
    # The dynamic packed pass does host work (its row lists become tensors inside), so the mode bites.
    with pytest.raises(AssertionError, match="host work"), NoHostWork():
        task.impl.packed.loss(model, PROMPTS, ANSWERS, 2)
    with pytest.raises(AssertionError, match="host work"), NoHostWork():
        torch.ones(3)[torch.tensor([True, False, True])]
    # Under bf16 autocast the LoRA matmuls run in bf16, each fp32 LoRA weight cast once per
    # step (autocast's cache), not once per call; the bf16 base is never cast.
    lora = {p.data_ptr(): n for n, p in model.named_parameters() if "lora_" in n}
    base = {p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n}
    casts = Counter(op[2] for op in first if op[0] == "aten._to_copy.default")
    assert {ptr: casts[ptr] for ptr in lora} == {ptr: 1 for ptr in lora}
    assert not base & set(casts)


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_the_static_step_has_no_graph_breaks(tiny_model, attention):
    model = run_like_model(tiny_model)
    task = static_task(model, torch.device("cpu"), attention)
    inputs = prepare(PROMPTS, ANSWERS, None, 2, task.impl.buckets, torch.device("cpu"))
    torch._dynamo.reset()
    # FlexAttention has no CPU backward: its graph is traced here without gradients.
    with task.impl.attention.packed(), torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.set_grad_enabled(attention != "flex"):
            explained = torch._dynamo.explain(step_loss)(model, inputs, task.impl.mask)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them as traced (no
    inductor); made with dynamo's caches emptied."""

    def __init__(self):
        torch._dynamo.reset()
        self.graphs = []

    def __call__(self, graph, example_inputs):
        self.graphs.append(graph)
        return graph.forward


def compiled_against_eager(model, compiled_step) -> tuple[int, list[int]]:
    """Runs `compiled_step(buckets, backend)` (a compiled step_loss) on four passes at buckets of
    16 and 32 tokens, each loss against the eager step's, its backward after: (graphs compiled,
    each pass's length)."""
    backend = CountingBackend()
    buckets = Buckets((5, 9, 30), (16, 32), 4, 4)
    step = compiled_step(buckets, backend)
    impl = StaticPacked(model, static_task(model, torch.device("cpu")).impl.packed, buckets, "sdpa", None)
    other = (OTHER[0], [ANSWERS[t] for t in OTHER[1]])
    # Passes of 3 + 9, 3 + 7, 3 + 10 and 3 + 29 tokens.
    batches = [(PROMPTS[:2], ANSWERS[:2]), other, (PROMPTS[2:3], ANSWERS[2:3]), (PROMPTS, ANSWERS)]
    lengths = []
    for prompts, answers in batches:
        inputs = prepare(prompts, answers, None, 2, buckets, torch.device("cpu"))
        with impl.attention.packed():
            loss = step(model, inputs, impl.mask)
            eager = step_loss(model, inputs, impl.mask)
        loss.backward()
        lengths.append(inputs.ids.shape[1])
        assert loss.item() == pytest.approx(eager.item(), abs=1e-5)
    return len(backend.graphs), lengths


def test_the_compiled_step_compiles_once_per_bucket_and_gives_the_eager_loss(tiny_model):
    model = lora_model(tiny_model).train()
    graphs, lengths = compiled_against_eager(
        model, lambda b, backend: CompiledStep(step_loss, None, 2, backend=backend)
    )
    assert lengths == [16, 16, 16, 32] and graphs == 2


def test_compiled_layers_compile_one_graph_per_bucket_for_every_layer(tiny_model):
    """Regional compilation: the layers run one compiled graph per bucket (torch.compile takes a
    layer's weights as inputs; the first layer's input is made to need a gradient as the others'
    do), inside the step only. The tiny model with four layers here."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model)
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).train()
    layers = decoder_layers(model)
    graphs, lengths = compiled_against_eager(
        model, lambda b, backend: CompiledLayers(step_loss, layers, None, 2, backend=backend)
    )
    assert len(layers) == 4 and lengths == [16, 16, 16, 32] and graphs == 2
    assert all(layer._compiled_call_impl is None for layer in layers)  # eager again outside the step


def test_flex_attentions_block_mask_made_each_step_compiles_once(tiny_model):
    """The block mask is made in each step from its row ids (its mask_mod a new closure each
    time): the compiled layers still run one graph for passes of one length. Forward only (no
    CPU backward for FlexAttention)."""
    model = lora_model(tiny_model)
    backend = CountingBackend()
    buckets = Buckets((5, 9, 30), (16, 32), 4, 4)
    impl = StaticPacked(model, static_task(model, torch.device("cpu")).impl.packed, buckets, "flex", None)
    step = CompiledLayers(step_loss, decoder_layers(model), None, 2, backend=backend)
    other = (OTHER[0], [ANSWERS[t] for t in OTHER[1]])
    with torch.no_grad(), impl.attention.packed():
        for prompts, answers in [(PROMPTS[:2], ANSWERS[:2]), other, (PROMPTS[2:3], ANSWERS[2:3])]:
            inputs = prepare(prompts, answers, None, 2, buckets, torch.device("cpu"))
            assert step(model, inputs, impl.mask).item() == pytest.approx(step_loss(model, inputs, impl.mask).item())
    assert len(backend.graphs) == 1


def test_a_compiler_failure_costs_speed_not_the_run(tiny_model, caplog):
    """A backend that fails: the step runs eagerly from then on, with the same loss, and the
    engine's record says compiling failed."""
    model = lora_model(tiny_model).train()

    def failing(graph, example_inputs):
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    engine = dispatch(model, Fast(static_shapes="true"), torch.device("cpu"))
    task = engine.for_training(
        LabelWords(ANSWERS, ANSWERS, ["a", "b", "c", "d"], 2, True, engine.answers), model, PROMPTS, [0, 1, 2, 3], 4
    )
    expected = task.loss(model, PROMPTS, [0, 1, 2, 3]).item()
    task.impl.step = CompiledStep(step_loss, None, 1, backend=failing)
    assert task.loss(model, PROMPTS, [0, 1, 2, 3]).item() == pytest.approx(expected, abs=1e-6)
    assert task.impl.step is step_loss and engine.chosen["compile"] == "off: compiling failed (BackendCompilerFailed)"
    assert "torch.compile failed" in caplog.text


def test_the_plan_compiles_where_asked_and_records_it(tiny_model):
    model = lora_model(tiny_model)
    cpu = torch.device("cpu")
    assert dispatch(model, Fast(), cpu).chosen["compile"] == "off"  # auto: not on a CPU
    assert dispatch(model, Fast(), cpu).static is None
    engine = dispatch(model, Fast(compile="true"), cpu)
    assert engine.static.compiled == ("layer", None) and engine.chosen["compile"] == "layer (default)"
    assert engine.train_streams == 1 and engine.chosen["fused kernels"] == "none"
    assert dispatch(model, Fast(compile="true", compile_scope="step"), cpu).static.compiled == ("step", None)
    with pytest.raises(EmorecError, match="fast.static_shapes"):
        Fast(compile="true", static_shapes="false")
    with pytest.raises(EmorecError, match="fast.compile="):
        Fast(compile="sometimes")
    task = static_task(model, cpu)
    assert dispatch(model, Fast(static_shapes="true"), cpu).chosen["static step"] == "on"
    # One pass of all four: 3 + 5 + 6 + 9 + 2 tokens, rounded up to a multiple of 8.
    assert task.impl.buckets.describe() == {"prefix": 3, "lengths": [32], "rows": 4, "slots": 4}


# Kernel-launching ops per decoder layer of a training step on the tiny model (LoRA on q, v and
# down projections, bf16 autocast), as measured when issue 38 pinned them: 218 before it (the
# packed pass); 208 for the packed pass with its query scaled once and split rather than sliced;
# 148 for the static step, its attention one fused kernel each way over a mask made once for all
# layers (experiments/compile/README.md). A change that adds ops fails here.
OP_BUDGET = {"static": 148, "dynamic": 208}


def test_a_decoder_layer_stays_within_its_op_budget(tiny_model):
    model = run_like_model(tiny_model)
    task = static_task(model, torch.device("cpu"))

    def step(static: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (
                task.loss(model, PROMPTS, [0, 1, 2, 3]) if static else task.impl.packed.loss(model, PROMPTS, ANSWERS, 2)
            )
        loss.backward()

    for kind, budget in OP_BUDGET.items():
        ops = per_layer(model, partial(step, kind == "static"))
        assert 0 < sum(ops.values()) <= budget, (kind, ops)


CUDA = torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_flex_attention_gives_the_sdpa_loss_and_gradients_on_a_gpu(tiny_model, compiled):
    """FlexAttention's block mask (the compiled GPU step's attention), eager and compiled,
    against SDPA with the dense mask: loss and LoRA gradients (its backward has no CPU kernel)."""
    model = lora_model(tiny_model, device=CUDA).train()
    results = {}
    for attention in ("sdpa", "flex"):
        task = static_task(model, CUDA, attention)
        if compiled and attention == "flex":
            torch._dynamo.reset()
            task.impl.step = CompiledStep(step_loss, None, 1)
        model.zero_grad(set_to_none=True)
        loss = task.loss(model, PROMPTS, [0, 1, 2, 3])
        loss.backward()
        results[attention] = (loss.item(), grads(model))
    assert results["flex"][0] == pytest.approx(results["sdpa"][0], abs=1e-4)
    assert torch.allclose(results["flex"][1], results["sdpa"][1], atol=1e-4)


@pytest.mark.gpu
def test_the_default_gpu_plan_compiles_the_static_step_and_matches_the_reference(tiny_model):
    model = lora_model(tiny_model, device=CUDA).train()
    engine = dispatch(model, Fast(), CUDA)
    assert engine.static.attention == "flex" and engine.static.compiled == ("layer", None)
    task = engine.for_training(
        LabelWords(ANSWERS, ANSWERS, ["a", "b", "c", "d"], 2, True, engine.answers), model, PROMPTS, [0, 1, 2, 3], 4
    )
    expected = reference.answer_loss(model, PROMPTS, ANSWERS, 2)
    expected.backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    for _ in range(2):  # the first call compiles, the second runs the compiled graph
        model.zero_grad(set_to_none=True)
        loss = task.loss(model, PROMPTS, [0, 1, 2, 3])
        loss.backward()
        assert loss.item() == pytest.approx(expected.item(), abs=1e-4)
        assert torch.allclose(grads(model), ref, atol=1e-4)


def test_fused_kernels_patch_this_model_only(tiny_model, monkeypatch):
    """Liger (a stand-in here: the real one needs Triton and a GPU) replaces the RMSNorm class in
    transformers' Llama module as well as this model's norms: the class is put back, the
    model's own modules keep the kernels, and a compiled step asks for none."""
    import sys
    import types

    from transformers.models.llama import modeling_llama

    from emorec.fast.kernels import dispatch_kernels

    class FusedNorm(torch.nn.Module):
        pass

    def apply(model, **kwargs):
        assert kwargs["rms_norm"] and kwargs["swiglu"] and not kwargs["rope"]
        modeling_llama.LlamaRMSNorm = FusedNorm  # what Liger does to the module
        model.model.norm.fused = True  # and to the instance

    liger = types.ModuleType("liger_kernel.transformers")
    liger._apply_liger_kernel_to_instance = apply
    patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": apply}
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", liger)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", patch)
    model = lora_model(tiny_model)
    original = modeling_llama.LlamaRMSNorm
    assert dispatch_kernels(model, Fast(), torch.device("cuda"), None) == "liger (RMSNorm, SwiGLU)"
    assert modeling_llama.LlamaRMSNorm is original and model.base_model.model.model.norm.fused
    compiled = type(dispatch(model, Fast(compile="true"), torch.device("cpu")).static)("flex", ("layer", None), 8, 8)
    assert dispatch_kernels(model, Fast(), torch.device("cuda"), compiled) == "none"
    assert dispatch_kernels(model, Fast(fused_kernels=False), torch.device("cuda"), None) == "none"
