"""A PEFT adapter's config for a run, and how a prompt-learning adapter's new weights start
(adapter.init).

P-Tuning v2 (PEFT's prefix tuning) starts by default from a unit-normal embedding: every layer
then attends to 32 large random keys and values, and the first-step loss on a MELD batch is 36.6
where the base model's is 9.4. `zero` starts from keys and values of zero (near-neutral: 7.6 on
that batch); `text` from the keys and values the model itself computes for a text (Li & Liang
2021), so the prefix starts as real words would (9.0): experiments/classifiers.
"""

import torch
from peft import PeftConfig, PeftModel, PromptTuningInit, initialize_kv_prefix_from_past_key_values

from emorec.tensors import base_of, device_of, on_device


def prepare(config: PeftConfig, init: str | None, decoder_classifier: bool) -> PeftConfig:
    """The adapter's PEFT config with the run's choices set: init=zero (prefix tuning) and
    init=vocab (prompt tuning) are PEFT's own options; a decoder classifier's head trains and
    is saved with the adapter (modules_to_save). PEFT's SEQ_CLS wrapper cannot serve a decoder
    classifier (its prefix tuning looks for `past_key_values` in transformers 5's signatures,
    and its soft prompts pool at a padded position), so it takes PEFT's plain wrapper
    (FEATURE_EXTRACTION), which passes the inputs through as they are."""
    if init == "zero":
        config.init_weights = "zero"
    elif init == "vocab":
        config.prompt_tuning_init = PromptTuningInit.SAMPLE_VOCAB
    if decoder_classifier:
        config.task_type = "FEATURE_EXTRACTION"
        config.modules_to_save = [*(config.modules_to_save or []), "score"]
    return config


def filled(ids: list[int], n: int) -> list[int]:
    """`ids` repeated to n tokens (cut to n when longer)."""
    return (ids * (n // max(len(ids), 1) + 1))[:n]


@torch.no_grad()
def init_from_text(model: PeftModel, text_ids: list[int]) -> None:
    """A prompt-learning adapter's virtual tokens start from a text's tokens, repeated to the
    adapter's length: prefix tuning takes the keys and values the base model computes for them,
    prompt tuning their input embeddings."""
    config = model.active_peft_config
    n = config.num_virtual_tokens
    ids = on_device([filled(text_ids, n)], device_of(model))
    if config.peft_type == "PREFIX_TUNING":
        # The transformer without its head: a classifier's fp32 head would meet a bf16 base
        # outside autocast, and no logits are needed.
        base = base_of(model)
        cache = getattr(base, base.base_model_prefix)(input_ids=ids, use_cache=True).past_key_values
        initialize_kv_prefix_from_past_key_values(model, past_key_values=cache, num_virtual_tokens=n)
    else:
        embedding = model.prompt_encoder[model.active_adapter].embedding
        embedding.weight.copy_(base_of(model).get_input_embeddings()(ids[0]).to(embedding.weight))
