"""adapter.init: how P-Tuning v2's prefix and prompt tuning's soft prompt start."""

import pytest
import torch
from hydra.utils import instantiate
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from emorec import reference
from emorec.adapters import filled, init_from_text, prepare
from emorec.errors import EmorecError
from emorec.run import run
from emorec.settings import check_config

PROMPTS = [[5, 9, 30, 41, 7], [12, 13, 14], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
ANSWERS = [[20, 2], [21, 22, 2], [23, 2]]


def adapted(tiny_model, make_cfg, *overrides):
    cfg = make_cfg(*overrides)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    return get_peft_model(base, prepare(instantiate(cfg.adapter.peft), cfg.adapter.init, False)).eval(), cfg


def test_zero_prefix_starts_near_the_base_model(tiny_model, make_cfg):
    """init=zero: every layer's prefix keys and values are zero, and the first step's loss is
    within 10 % of the base model's on the same batch (random init: far above it)."""
    model, _ = adapted(tiny_model, make_cfg, "adapter=ptuning_v2", "adapter.init=zero")
    past = model.get_prompt(batch_size=1)
    assert all(torch.count_nonzero(layer.keys) == 0 and torch.count_nonzero(layer.values) == 0 for layer in past.layers)
    base_loss = reference.answer_loss(model.get_base_model(), PROMPTS, ANSWERS, 2).item()
    zero_loss = reference.answer_loss(model, PROMPTS, ANSWERS, 2).item()
    assert zero_loss == pytest.approx(base_loss, rel=0.10)
    random, _ = adapted(tiny_model, make_cfg, "adapter=ptuning_v2", "adapter.init=random")
    assert torch.count_nonzero(random.get_prompt(batch_size=1).layers[0].keys) > 0


def test_text_prefix_holds_the_texts_keys_and_values(tiny_model, make_cfg):
    model, cfg = adapted(tiny_model, make_cfg, "adapter=ptuning_v2", "adapter.init=text")
    text = [40, 41, 42, 43, 44]
    init_from_text(model, text)
    n = cfg.adapter.num_virtual_tokens
    ids = torch.tensor([filled(text, n)])
    assert ids.shape == (1, n) and ids[0, :10].tolist() == text + text
    expected = model.get_base_model()(input_ids=ids, use_cache=True).past_key_values
    past = model.get_prompt(batch_size=1)
    for mine, theirs in zip(past.layers, expected.layers):
        assert torch.allclose(mine.keys, theirs.keys, atol=1e-6) and torch.allclose(
            mine.values, theirs.values, atol=1e-6
        )


def test_text_soft_prompt_holds_the_texts_embeddings(tiny_model, make_cfg):
    model, cfg = adapted(
        tiny_model, make_cfg, "adapter=prompt_tuning", "adapter.num_virtual_tokens=6", "adapter.init=text"
    )
    init_from_text(model, [40, 41, 42, 43])
    embedding = model.prompt_encoder["default"].embedding.weight
    words = model.get_base_model().get_input_embeddings().weight
    assert torch.equal(embedding, words[[40, 41, 42, 43, 40, 41]])


def test_vocab_soft_prompt_starts_from_vocabulary_embeddings(tiny_model, make_cfg):
    model, _ = adapted(
        tiny_model, make_cfg, "adapter=prompt_tuning", "adapter.num_virtual_tokens=6", "adapter.init=vocab"
    )
    words = model.get_base_model().get_input_embeddings().weight
    rows = model.prompt_encoder["default"].embedding.weight
    assert all((words == row).all(-1).any() for row in rows)


def test_runs_with_each_init(make_cfg, tmp_path):
    first = {}
    for init in ("random", "zero", "text"):
        cfg = make_cfg(
            "adapter=ptuning_v2", f"adapter.init={init}", "trainer.epochs=1", f"output_dir={tmp_path / init}"
        )
        metrics = run(cfg)
        assert metrics["train"]["steps"] == 4
        first[init] = metrics["train"]["losses"][0]
    assert first["zero"] < first["random"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["adapter=ptuning_v2", "adapter.init=vocab"], "adapter.init='vocab' is not valid for adapter=ptuning_v2"),
        (["adapter=prompt_tuning", "adapter.init=zero"], "adapter.init='zero' is not valid for adapter=prompt_tuning"),
        (["adapter=ptuning_v2", "adapter.init=text", "adapter.prefix_projection=true"], "prefix_projection=true"),
    ],
)
def test_bad_init_is_refused(overrides, message, make_cfg):
    with pytest.raises(EmorecError, match=message):
        check_config(make_cfg(*overrides))
