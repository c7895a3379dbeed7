"""Model configs for GPU users, checked offline: each composes, opts in to remote code only
where its architecture needs it, and its LoRA targets and P-Tuning v2 fit a small randomly
initialised model of the same transformers architecture (built here from a config)."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from peft import LoraConfig, PrefixTuningConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from emorec import reference
from emorec.fast import candidates
from emorec.model import quantization_settings
from tests.conftest import CONF, TINY_SIZES

# option -> transformers model_type of its architecture (None: remote code, not buildable here)
GPU_MODELS = {
    "chatglm2_6b": "glm",  # converted to the native class (emorec.glm)
    "chatglm3_6b": "glm",
    "glm4_9b_chat": "glm",
    "qwen2_5_7b_instruct": "qwen2",
    "llama3_1_8b_instruct": "llama",
}


def model_cfg(option):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[f"model={option}"]).model


@pytest.mark.parametrize("option", GPU_MODELS)
def test_gpu_model_configs_compose(option):
    m = model_cfg(option)
    assert m.name == option and m.name_or_path and m.lora_target_modules
    assert not m.trust_remote_code  # every architecture is native to transformers


def tiny(model_type):
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=64,
        **TINY_SIZES,
        head_dim=8,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return AutoModelForCausalLM.from_config(config).eval()


ARCHS = [(o, t) for o, t in GPU_MODELS.items() if t]
PROMPTS = [[5, 9, 30, 41, 7], [5, 9, 30, 12]]
ANSWERS = [[20, 2], [21, 22, 2]]


@pytest.mark.parametrize("option,model_type", ARCHS, ids=[o for o, _ in ARCHS])
def test_lora_targets_exist_in_the_architecture(option, model_type):
    targets = list(model_cfg(option).lora_target_modules)
    model = tiny(model_type)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert set(targets) <= names
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    assert peft.get_nb_trainable_parameters()[0] > 0
    expected = reference.answer_loss(peft, PROMPTS, ANSWERS, pad_id=0)
    found = candidates(peft)
    # The shared prefix packed into the rows' pass (through SDPA, as on a GPU, and the CPU's way).
    assert [name for name, _ in found[:2]] == ["packed pass (SDPA)", "packed pass"]
    for name, impl in found:
        loss = impl.loss(peft, PROMPTS, ANSWERS, 0)
        assert loss.item() == pytest.approx(expected.item(), abs=1e-5), name
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in peft.parameters() if p.requires_grad)


@pytest.mark.parametrize("option,model_type", ARCHS, ids=[o for o, _ in ARCHS])
def test_ptuning_v2_runs_on_the_architecture(option, model_type):
    peft = get_peft_model(tiny(model_type), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    name, impl = candidates(peft)[0]
    assert name == "head at positions"  # a prompt-learning adapter's own prefix comes first
    loss = impl.loss(peft, PROMPTS, ANSWERS, 0)
    loss.backward()
    scores = impl.scores(peft, PROMPTS, ANSWERS, 0, False)
    assert torch.allclose(scores, reference.score_labels(peft, PROMPTS, ANSWERS, 0), atol=1e-4)
    assert torch.isfinite(loss) and scores.shape == (2, 2) and torch.isfinite(scores).all()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in peft.parameters() if p.requires_grad)


@pytest.mark.parametrize("option", GPU_MODELS)
def test_qlora_is_one_override_away(option):
    # model.quantization reaches the loader; the loader's settings are QLoRA's (NF4, double
    # quantisation, bf16 compute). Loading itself needs bitsandbytes and a GPU.
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        m = compose("config", overrides=[f"model={option}", "model.quantization=4bit"]).model
    assert m.quantization == "4bit" and m.load.quantization == "4bit"
    four = quantization_settings("4bit")
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_settings("8bit").load_in_8bit
