"""head=classifier on a decoder LLM: a linear head over the dataset's labels on the final hidden
state of the prompt's last token.

The model becomes transformers' sequence classifier for its architecture (LlamaForSequenceClassification,
Qwen2ForSequenceClassification, ...: the backbone and a `score` layer), sharing the loaded
backbone, so a trained adapter reloads on a fresh `AutoModelForSequenceClassification` base with
`PeftModel.from_pretrained`. The prompt stays the same, instruction and label list included:
they tell the model what is asked.

A randomly initialised head starts far from what the LM already knows and collapses onto the
majority class (measured on MELD: weighted F1 0.316 against label scoring's 0.499). `init=labels`
starts each label's row from the LM head's row for that label's first answer token, so before
training the head's argmax is first-token label scoring exactly.
"""

import torch
from transformers import AutoModelForSequenceClassification

from emorec.errors import EmorecError
from emorec.tensors import base_of


def decoder_classifier(model, labels: list[str], pad_id: int, init: str, first_tokens: list[int] | None):
    """`model` (a causal LM) as a sequence classifier over `labels`: its backbone, and a new fp32
    head (trained weights stay fp32 over a bf16 base) initialised from the LM head's rows of
    `first_tokens`, and its bias if it has one (init=labels), or at random (init=random, as
    transformers initialises a head, from the run's seed). The LM head is dropped."""
    config = model.config
    kind = AutoModelForSequenceClassification._model_mapping.get(type(config), None)
    if kind is None:
        raise EmorecError(f"transformers has no sequence classifier for model type {config.model_type!r}; use head=lm")
    lm_head = model.get_output_embeddings()
    # The classifier shares the model's config: its layers read the attention implementation
    # from it (emorec.fast switches it for the packed pass).
    config.num_labels, config.pad_token_id = len(labels), pad_id
    config.id2label, config.label2id = dict(enumerate(labels)), {label: i for i, label in enumerate(labels)}
    attention = config._attn_implementation
    with torch.device("meta"):  # the backbone comes from `model`: nothing is allocated twice
        classifier = kind(config)
    config._attn_implementation = attention  # as the model loaded (a new model would choose its own)
    setattr(classifier, classifier.base_model_prefix, getattr(model, model.base_model_prefix))
    bias = lm_head.bias is not None
    head = torch.nn.Linear(lm_head.in_features, len(labels), bias=bias, device=lm_head.weight.device)
    with torch.no_grad():
        if init == "labels":
            head.weight.copy_(lm_head.weight[first_tokens])
            if bias:
                head.bias.copy_(lm_head.bias[first_tokens])
        else:
            head.weight.normal_(0.0, getattr(config, "initializer_range", 0.02))
            if bias:
                head.bias.zero_()
    classifier.score = head
    return classifier.eval()


def head_parameters(model) -> list[torch.nn.Parameter]:
    """The trainable parameters of a classifier's head (a decoder's `score`, an encoder's
    `classifier`), for their own learning rate (head.lr)."""
    base = base_of(model)
    head = getattr(base, "score", None) or getattr(base, "classifier", None)
    return [p for p in head.parameters() if p.requires_grad] if head is not None else []
