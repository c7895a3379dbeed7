"""The objective in its plain form: what emorec computes, with no speed machinery.

A causal LM answers with label words. Its training loss is the answer's negative
log-likelihood given the prompt (summed over the answer's tokens, averaged over examples), and
it scores a label by the same quantity: the log-likelihood of that label's answer after the
prompt (or of its first token only: greedy decoding constrained to the label set). It can also
generate freely, the answer then parsed into a label, as the paper evaluated. A sequence
classifier has a head over the labels instead, trained with cross-entropy.

Batches are right-padded and carry no position ids, so every model (rotary or absolute
positions) and every PEFT method (including those that put virtual tokens before the input)
sees each sequence at its natural positions. Every tensor is created on the model's device.
`emorec.fast` computes the same quantities faster; its tests compare each of its components
with these functions.
"""

import re

import torch

from emorec.tensors import all_logits, device_of, on_device, right_pad


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The examples' mean loss, each example's weighted (class-balanced training; None: equal).
    The weights average 1 over the training set, so the sum over a batch is divided by its rows,
    not by the weights' sum: a batch split into passes still adds up to the batch's loss."""
    return losses.mean() if weights is None else (losses * weights.to(losses)).sum() / len(losses)


def target_logp(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Each position's log-probability of its target, from (..., vocabulary) logits, in fp32. With
    label smoothing e (trainer.label_smoothing), (1 - e) log p(target) + e mean_v log p(v): its
    negative is the cross-entropy against the target smoothed uniformly over the logits' entries
    (Szegedy et al. 2016; torch's cross_entropy(label_smoothing=e)): a head's labels, or a language
    model's whole vocabulary, as transformers' label_smoothing_factor."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets[..., None]).squeeze(-1)
    return (1 - smoothing) * picked + smoothing * logp.mean(-1) if smoothing else picked


def answer_logprobs(
    model, prompts: list[list[int]], answers: list[list[int]], pad_id: int, smoothing: float = 0.0
) -> torch.Tensor:
    """(batch,) log-likelihood of each answer after its prompt, summed over the answer's tokens,
    from one forward pass over the right-padded prompt + answer sequences (`smoothing`: see
    target_logp; training only)."""
    device = device_of(model)
    ids, mask = right_pad([p + a for p, a in zip(prompts, answers)], pad_id, device)
    # A prompt-learning adapter's virtual tokens come first: the last positions are the input's.
    logits = all_logits(model, input_ids=ids, attention_mask=mask)[:, -ids.shape[1] :]
    # Answer token j of row r sits at len(prompt) + j; the position before it predicts it.
    row = on_device([r for r, a in enumerate(answers) for _ in a], device)
    col = on_device([len(p) + j for p, a in zip(prompts, answers) for j in range(len(a))], device)
    logp = target_logp(logits[row, col - 1], ids[row, col], smoothing)
    return torch.zeros(len(prompts), device=device).index_add(0, row, logp)


def answer_loss(
    model, prompts: list[list[int]], answers: list[list[int]], pad_id: int, weights=None, smoothing: float = 0.0
) -> torch.Tensor:
    """Mean over examples of the answer's negative log-likelihood: the loss sees the answer only,
    and it is the quantity that scoring ranks. `weights`: see weighted_mean; `smoothing`: see
    target_logp."""
    return weighted_mean(-answer_logprobs(model, prompts, answers, pad_id, smoothing), weights)


@torch.no_grad()
def score_labels(
    model, prompts: list[list[int]], answers: list[list[int]], pad_id: int, first_token: bool = False
) -> torch.Tensor:
    """(batch, labels) log-likelihood of each label's answer after each prompt; with
    `first_token`, of the answer's first token only (one pass: the next-token distribution
    after each prompt). Whole answers: one pass per label, each prompt followed by it."""
    if first_token:
        ids, mask = right_pad(prompts, pad_id, device_of(model))
        logits = all_logits(model, input_ids=ids, attention_mask=mask)[:, -ids.shape[1] :]
        last = logits[torch.arange(len(prompts), device=ids.device), mask.sum(1) - 1]
        return torch.log_softmax(last.float(), dim=-1)[:, [a[0] for a in answers]]
    return torch.stack([answer_logprobs(model, prompts, [a] * len(prompts), pad_id) for a in answers], 1)


def first_tokens_differ(answers: list[list[int]]) -> bool:
    """Whether each label's answer starts with its own token, so that the first token decides."""
    return len({a[0] for a in answers}) == len(answers)


def parse_label(text: str, labels: list[str]) -> int:
    """The label named first in a generated text (whole words, any case); -1 if none is."""
    hits = [(m.start(), i) for i, lab in enumerate(labels) if (m := re.search(rf"\b{re.escape(lab)}\b", text, re.I))]
    return min(hits)[1] if hits else -1


@torch.no_grad()
def generate_labels(
    model, tokenizer, prompts: list[list[int]], labels: list[str], max_new_tokens: int
) -> tuple[list[int], list[str]]:
    """Greedy generation parsed into labels. Left-padded, as `generate` expects."""
    width = max(map(len, prompts))
    device = device_of(model)
    ids = on_device([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts], device)
    mask = on_device([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [parse_label(t, labels) for t in texts], texts


def classifier_loss(
    model, prompts: list[list[int]], targets: list[int], pad_id: int, weights=None, smoothing: float = 0.0
) -> torch.Tensor:
    """An encoder classifier's loss: mean cross-entropy of its head over the labels."""
    ids, mask = right_pad(prompts, pad_id, device_of(model))
    logits = model(input_ids=ids, attention_mask=mask).logits
    losses = -target_logp(logits, on_device(targets, ids.device), smoothing)
    return weighted_mean(losses, weights)


@torch.no_grad()
def classifier_scores(model, prompts: list[list[int]], pad_id: int) -> torch.Tensor:
    """(batch, labels) log-probabilities from an encoder classifier's head."""
    ids, mask = right_pad(prompts, pad_id, device_of(model))
    return torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)


class Reference:
    """The plain path behind the interface of emorec.fast's answer components (loss, scores,
    the tokens a pass shares), so a run can take it in their place (`fast=off`)."""

    def shared_length(self, model, prompts: list[list[int]]) -> int:
        return 0

    def loss(self, model, prompts, answers, pad_id: int, weights=None, smoothing: float = 0.0) -> torch.Tensor:
        return answer_loss(model, prompts, answers, pad_id, weights, smoothing)

    def open(self, model, prompts: list[list[int]]) -> None:
        return None

    def scores(self, model, prompts, answers, pad_id: int, first_token: bool, prefix=None) -> torch.Tensor:
        return score_labels(model, prompts, answers, pad_id, first_token)
