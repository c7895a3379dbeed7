"""Device bugs caught without a GPU: the model's weights sit on a second device, `emorecfake`
(tests/fake_device.py: fake tensors of a Python privateuse1 backend), where any operation that
meets a CPU tensor raises, as on CUDA. So every engine function that builds an input, a target or
an index on the wrong device fails here. Fakes have no values, so the tensor functions run here
(losses and their backward, scores, a training step, the merged adapter), not whole runs;
test_gpu runs those on a real GPU.

Also: a lint that no tensor factory in the engine is called without a device (but for the few
marked "# on the host"), and each per-device choice of emorec.fast on a CUDA device as the
dispatcher sees it."""

import ast
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    FakeTensorDeviceMismatchError,
    FakeTensorMode,
)
from transformers import AutoModelForCausalLM

import emorec.reference
import emorec.tensors
from emorec import reference
from emorec.fast import Fast, candidates, dispatch
from emorec.fast.merge import merged_adapter
from emorec.tensors import is_quantized
from emorec.train import OnePass, TrainingProgress
from tests.fake_device import DEVICE, NAME, register
from tests.test_engine import ANSWERS, PACKED_ANSWERS, PACKED_PROMPTS, PROMPTS, lora_model, make_passes

REPO = Path(__file__).parent.parent


@pytest.fixture
def fake_mode() -> FakeTensorMode:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: test_gpu and test_engine run the engine on it")
    return register()  # registered at the session's start (conftest); this returns its mode


@pytest.fixture
def on_fake(fake_mode, tiny_model):
    """(the LoRA tiny model on the fake device, inside the mode)."""
    model = lora_model(tiny_model).train()
    with fake_mode:
        yield model.to(DEVICE)


def here(t: torch.Tensor) -> bool:
    return t.device.type == NAME


def grads_on_device(model) -> bool:
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    return bool(grads) and all(g is not None and here(g) for g in grads)


def test_the_fake_device_raises_where_cuda_would(on_fake):
    model = on_fake
    with pytest.raises(FakeTensorDeviceMismatchError):
        model(input_ids=torch.tensor([[1, 2, 3]]))  # CPU ids, device weights
    with pytest.raises(FakeTensorDeviceMismatchError):
        torch.zeros(2, device=DEVICE) + torch.ones(2)
    assert here(model(input_ids=torch.tensor([[1, 2, 3]], device=DEVICE)).logits)


def test_a_tensor_built_on_the_host_fails_the_engine_here(on_fake, monkeypatch):
    """The check can fail: with the reference's inputs left on the host, its loss raises."""
    host = lambda data, device, dtype=torch.long: torch.tensor(data)  # noqa: E731
    monkeypatch.setattr(emorec.reference, "on_device", host)
    monkeypatch.setattr(emorec.tensors, "on_device", host)
    with pytest.raises(FakeTensorDeviceMismatchError):
        reference.answer_loss(on_fake, PROMPTS, ANSWERS[:3], 2)


def test_every_answer_component_trains_on_the_device(on_fake):
    model = on_fake
    names = [name for name, _ in candidates(model)]
    assert names == ["packed pass (SDPA)", "packed pass", "prefix cache", "head at positions", "reference"]
    for name, impl in candidates(model):
        model.zero_grad()
        loss = impl.loss(model, PACKED_PROMPTS, PACKED_ANSWERS, 2)
        assert here(loss) and loss.shape == (), name
        loss.backward()
        assert grads_on_device(model), name


@pytest.mark.parametrize("first_token", [False, True])
def test_every_answer_component_scores_on_the_device(on_fake, first_token):
    model = on_fake.eval()
    for name, impl in candidates(model):
        with torch.no_grad():
            prefix = impl.open(model, PACKED_PROMPTS)
            for cached in (prefix, None):
                scores = impl.scores(model, PACKED_PROMPTS, ANSWERS, 2, first_token, cached)
                assert here(scores) and scores.shape == (len(PACKED_PROMPTS), len(ANSWERS)), name


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning"])
def test_prompt_learning_adapters_on_the_device(fake_mode, tiny_model, kind):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    config = (PromptTuningConfig if kind == "prompt_tuning" else PrefixTuningConfig)(
        task_type="CAUSAL_LM", num_virtual_tokens=3
    )
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), config)
    with fake_mode:
        model.to(DEVICE)
        for name, impl in candidates(model):
            loss = impl.loss(model, PROMPTS, ANSWERS[:3], 2)
            loss.backward()
            assert grads_on_device(model), name
            with torch.no_grad():
                assert here(impl.scores(model, PROMPTS, ANSWERS, 2, False)), name


def test_a_training_step_and_the_merged_adapter_on_the_device(on_fake):
    """The loop's step (its losses stay on the device until read), clipping, AdamW, and the
    adapter merged for evaluation with the weights restored from host copies. Fake tensors have
    no values, so reading one (.item(), .tolist(), a bool of a tensor) raises here: the step
    provably reads nothing back from the device."""
    model = on_fake
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = OnePass(make_passes(model, PACKED_PROMPTS, PACKED_ANSWERS, max_tokens=12)).step(
        [[0, 1], [2, 3]], TrainingProgress()
    )
    assert here(losses) and losses.shape == (2,)
    with pytest.raises(DataDependentOutputException):  # what a read inside the step would meet
        losses.tolist()
    assert here(torch.nn.utils.clip_grad_norm_(params, 1.0))
    optimizer.step()
    engine = dispatch(model, Fast(), torch.device(DEVICE))
    assert engine.chosen["merged adapter"] and engine.train_streams == 1 and engine.eval_streams == 1
    with merged_adapter(model.eval()), torch.no_grad():
        assert here(engine.answers.scores(model, PACKED_PROMPTS, ANSWERS, 2, True))
    assert all(here(p) for p in model.parameters())


def test_a_sequence_classifier_on_the_device(fake_mode, tiny_model):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    vocab = len(AutoTokenizer.from_pretrained(tiny_model))
    config = BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, num_labels=3
    )
    model = BertForSequenceClassification(config)
    with fake_mode:
        model.to(DEVICE)
        loss = reference.classifier_loss(model, PROMPTS, [0, 2, 1], 2)
        loss.backward()
        assert grads_on_device(model)
        with torch.no_grad():
            assert reference.classifier_scores(model, PROMPTS, 2).shape == (3, 3)


# The engine: whatever computes on the model's device.
ENGINE = [
    "reference.py",
    "tensors.py",
    "tasks.py",
    "evaluate.py",
    "train.py",
    *(f"fast/{p.name}" for p in (REPO / "emorec/fast").glob("*.py")),
]
FACTORIES = {
    "tensor", "as_tensor", "arange", "zeros", "ones", "full", "empty", "rand", "randn", "randint", "randperm",
    "eye", "linspace", "tril_indices", "triu_indices",
}  # fmt: skip


def test_no_tensor_factory_in_the_engine_lacks_a_device():
    unmarked = []
    for name in ENGINE:
        path = REPO / "emorec" / name
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            func = node.func
            if not (isinstance(func.value, ast.Name) and func.value.id == "torch" and func.attr in FACTORIES):
                continue
            if any(k.arg == "device" for k in node.keywords):
                continue
            if "# on the host" not in lines[node.lineno - 1]:
                unmarked.append(f"emorec/{name}:{node.lineno}: torch.{func.attr}(...) has no device")
    assert not unmarked, "\n".join(unmarked)


def test_the_lint_sees_a_factory_without_a_device(tmp_path, monkeypatch):
    """The lint can fail: a module with a bare torch.arange is reported."""
    import tests.test_device as me

    (tmp_path / "emorec").mkdir()
    (tmp_path / "emorec" / "bad.py").write_text("import torch\nx = torch.arange(3)\n")
    monkeypatch.setattr(me, "REPO", tmp_path)
    monkeypatch.setattr(me, "ENGINE", ["bad.py"])
    with pytest.raises(AssertionError, match="bad.py:2: torch.arange"):
        test_no_tensor_factory_in_the_engine_lacks_a_device()


CUDA = torch.device("cuda")


def test_bf16_only_where_the_gpu_computes_it_natively(monkeypatch):
    """torch.cuda.is_bf16_supported() counts emulation (V100, T4) as support; emorec asks for
    tensor cores that compute bf16 (compute capability 8.0 on)."""
    from emorec.fast import use_bf16

    for capability, native in [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert use_bf16("auto", CUDA) is native
    assert use_bf16("fp32", CUDA) is False and use_bf16("bf16", CUDA) is True


@pytest.mark.parametrize(
    ("machine", "avx512_bf16", "amx", "onednn", "native"),
    [
        ("x86_64", False, False, True, False),  # AVX-512 without BF16 (Ice Lake): oneDNN says yes, emulated
        ("x86_64", True, False, True, True),  # AVX-512 BF16 (Zen 4, Cooper Lake)
        ("x86_64", False, True, True, True),  # AMX (Sapphire Rapids)
        ("x86_64", False, False, False, False),  # AVX2 only
        ("aarch64", False, False, True, True),  # Arm's BF16 extension: oneDNN's answer
    ],
)
def test_bf16_only_where_the_cpu_computes_it(monkeypatch, machine, avx512_bf16, amx, onednn, native):
    import platform

    from emorec.fast import use_bf16

    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    assert use_bf16("auto", torch.device("cpu")) is native
    assert use_bf16("bf16", torch.device("cpu")) is True and use_bf16("fp32", torch.device("cpu")) is False


def test_attention_kernel_per_device(monkeypatch):
    import importlib.util

    from emorec.fast import dispatch_attention

    assert dispatch_attention("auto", torch.device("cpu"), torch.bfloat16) == "eager"
    assert dispatch_attention("sdpa", torch.device("cpu"), torch.bfloat16) == "sdpa"  # the user's choice stays
    assert dispatch_attention(None, CUDA, torch.bfloat16) is None
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    assert dispatch_attention("auto", CUDA, torch.bfloat16) == "sdpa"
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a)
    )
    assert dispatch_attention("auto", CUDA, torch.bfloat16) == "flash_attention_2"
    assert dispatch_attention("auto", CUDA, torch.float32) == "sdpa"  # flash-attn has no fp32 kernels


def test_the_dispatcher_on_a_gpu(tiny_model, monkeypatch):
    """On CUDA: the packed pass through SDPA, no thread streams, token budgets from the GPU's free
    memory (halved, 34 bytes per layer and hidden unit per trained token), a fused optimizer."""
    from emorec.fast import MOST_TOKENS, optimizer_options, token_budgets

    model = lora_model(tiny_model)  # 2 layers x 32 hidden units, fp32 base
    free = 2 * 34 * 2 * 32 * 2 * 5000  # half of it holds 5000 trained tokens
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    engine = dispatch(model, Fast(eval_streams=2, train_streams=2), CUDA)
    assert engine.chosen["answers"] == "packed pass (SDPA)" and engine.answers.fused
    assert engine.eval_streams == engine.train_streams == 1
    assert engine.max_pass_tokens == 5000 and engine.chosen["eval batch tokens"] == min(MOST_TOKENS, 5000 * 34 // 8)
    assert token_budgets(model, CUDA, 777) == (777, min(MOST_TOKENS, 5000 * 34 // 8))  # a set budget wins
    assert token_budgets(model, torch.device("cpu"), "auto") == (1024, None)
    cpu = dispatch(model, Fast(eval_streams=2, train_streams=2), torch.device("cpu"))
    assert cpu.chosen["answers"] == "packed pass" and cpu.eval_streams == 2
    from functools import partial

    adamw = partial(torch.optim.AdamW, lr=1e-3)
    assert optimizer_options(adamw, CUDA) == {"fused": True} and optimizer_options(adamw, torch.device("cpu")) == {}
    assert optimizer_options(partial(torch.optim.AdamW, fused=False), CUDA) == {}  # the config's choice stays
    assert optimizer_options(partial(torch.optim.RMSprop), CUDA) == {}  # no fused kernel


def test_a_quantised_base_is_never_merged(tiny_model):
    """QLoRA: bitsandbytes' merge writes new quantised tensors, so restoring is not exact."""
    from emorec.fast.merge import can_merge

    model = lora_model(tiny_model)
    assert can_merge(model)
    model.get_base_model().hf_quantizer = object()  # as transformers marks a bitsandbytes base
    assert is_quantized(model) and not can_merge(model)
    assert not dispatch(model, Fast(), torch.device("cpu")).chosen["merged adapter"]


def test_merged_weights_are_restored_from_host_copies(tiny_model):
    from emorec.tensors import host_copy

    model = lora_model(tiny_model, dtype=torch.bfloat16)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with merged_adapter(model):
        assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    w = torch.ones(3)
    copy = host_copy(w)
    assert copy.device.type == "cpu" and torch.equal(copy, w) and copy.data_ptr() != w.data_ptr()


def test_models_load_straight_to_a_gpu():
    """A device map puts each weight on the GPU as it is read (no host copy of the model); the
    CPU keeps the plain load."""
    from emorec.model import device_map

    assert device_map(None) is None and device_map("cpu") is None
    assert device_map("cuda") == {"": CUDA} and device_map(torch.device("cuda", 1)) == {"": torch.device("cuda", 1)}


def test_remote_code_models_keep_their_own_attention():
    """auto would ask a remote-code model (ChatGLM) for an attention kernel its code does not
    declare; those configs leave the choice to the model."""
    from hydra import compose, initialize_config_dir

    from emorec.fast import dispatch_attention
    from tests.conftest import CONF

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for option in ("chatglm2_6b", "chatglm3_6b", "qwen2_5_7b_instruct", "smollm2_135m"):
            model = compose("config", overrides=[f"model={option}"]).model
            chosen = dispatch_attention(model.load.attn_implementation, CUDA, torch.bfloat16)
            if model.get("trust_remote_code"):
                assert chosen is None, option
            else:
                assert chosen in ("sdpa", "flash_attention_2"), option


@pytest.mark.parametrize("adapter", ["lora", "prefix_tuning"])
def test_the_classifier_head_trains_and_scores_on_the_device(fake_mode, tiny_model, adapter):
    """head=classifier: the head's logits read by a hook, weighted (class-balanced) losses."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    from emorec.adapters import prepare
    from emorec.classifier import decoder_classifier
    from emorec.tasks import Balance, LabelHead

    torch.manual_seed(0)
    model = decoder_classifier(
        AutoModelForCausalLM.from_pretrained(tiny_model), list("abcd"), 2, "labels", [5, 6, 7, 8]
    )
    kind = (
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
        if adapter == "lora"
        else PrefixTuningConfig(num_virtual_tokens=3)
    )
    model = get_peft_model(model, prepare(kind, None, True))
    balance = Balance.of([0, 0, 1, 2, 3], 4, 1.0, 1.0)
    with fake_mode:
        model.to(DEVICE)
        for name, impl in candidates(model):
            task = LabelHead(list("abcd"), 2, impl, balance)
            loss = task.loss(model.train(), PACKED_PROMPTS[:3], [0, 2, 3])
            assert here(loss) and loss.shape == (), name
            loss.backward()
            assert grads_on_device(model), name
            with torch.no_grad():
                prefix = impl.open(model.eval(), PACKED_PROMPTS)
                scores = impl.scores(model, PACKED_PROMPTS, task.scored, 2, True, prefix)
                assert here(balance.adjusted(scores)) and scores.shape == (len(PACKED_PROMPTS), 4), name
            model.zero_grad()
