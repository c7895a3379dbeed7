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
import threading

import torch
from accelerate.utils import extract_model_from_parallel


def base_of(model):
    """The transformer under a PEFT wrapper (LoRA-style adapters live inside its modules;
    prompt-learning adapters act only through the wrapper's forward) and under a data-parallel
    wrapper (DDP)."""
    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_quantized(model) -> bool:
    """Whether the base's weights are 4/8-bit (a bitsandbytes base for QLoRA): transformers keeps
    its quantiser on the model."""
    base = base_of(model)
    return getattr(base, "hf_quantizer", None) is not None or bool(getattr(base, "is_quantized", False))


def pools(model) -> bool:
    """Whether the model is a decoder with a classification head over the labels (head=classifier,
    emorec.head): transformers' sequence classifier, whose forward keeps its head's logits at
    each row's last token only."""
    base = base_of(model)
    return base.get_output_embeddings() is None and isinstance(getattr(base, "score", None), torch.nn.Module)


def output_head(model) -> torch.nn.Module:
    """The module that turns final hidden states into logits: the LM head over the vocabulary,
    or a decoder classifier's head over the labels."""
    base = base_of(model)
    return base.score if pools(model) else base.get_output_embeddings()


def all_logits(model, **inputs) -> torch.Tensor:
    """Logits at every position of the model's output (batch, positions, vocabulary or labels).
    A decoder classifier's forward pools them at the last position that is not the pad token
    (the last position at all under a soft prompt), so a hook on its head reads them all; they
    then mean for it what they mean for a causal LM: position t's logits see tokens up to t."""
    if not pools(model):
        return model(**inputs).logits
    taken, me = [], threading.get_ident()

    def take(module, args, output):
        if threading.get_ident() == me:  # evaluation streams run the model in other threads too
            taken.append(output)

    handle = output_head(model).register_forward_hook(take)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return taken[-1]


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The examples' mean loss, each example's weighted (class-balanced training; None: equal).
    The weights average 1 over the training set, so the sum over a batch is divided by its rows,
    not by the weights' sum: a batch split into passes still adds up to the batch's loss."""
    return losses.mean() if weights is None else (losses * weights.to(losses)).sum() / len(losses)


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def on_device(data: list, device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A tensor of `data` (indices, token ids) on `device`. A plain copy to a GPU waits for
    everything queued there; this one goes through pinned memory, asynchronously, so building a
    batch's indices never stalls the GPU's work."""
    host = torch.tensor(data, dtype=dtype)  # on the host: the one tensor here built there
    if device is not None and torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` in host memory (weights kept aside: merged adapters' originals, the best
    epoch's): on a GPU it takes no device memory (2.7 GB of q/k/v/o projections at 8 B
    parameters; a whole model under full fine-tuning), and it is pinned, so copies run at full
    speed."""
    if t.device.type == "cuda":
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t.detach())  # on the host
    return t.detach().to("cpu", copy=True)


def right_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of right-padded sequences."""
    width = max(map(len, seqs))
    ids = on_device([s + [pad_id] * (width - len(s)) for s in seqs], device)
    mask = on_device([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device)
    return ids, mask


def answer_logprobs(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> torch.Tensor:
    """(batch,) log-likelihood of each answer after its prompt, summed over the answer's tokens,
    from one forward pass over the right-padded prompt + answer sequences."""
    device = device_of(model)
    ids, mask = right_pad([p + a for p, a in zip(prompts, answers)], pad_id, device)
    # A prompt-learning adapter's virtual tokens come first: the last positions are the input's.
    logits = all_logits(model, input_ids=ids, attention_mask=mask)[:, -ids.shape[1] :]
    # Answer token j of row r sits at len(prompt) + j; the position before it predicts it.
    row = on_device([r for r, a in enumerate(answers) for _ in a], device)
    col = on_device([len(p) + j for p, a in zip(prompts, answers) for j in range(len(a))], device)
    logp = torch.log_softmax(logits[row, col - 1].float(), dim=-1).gather(-1, ids[row, col][:, None])[:, 0]
    return torch.zeros(len(prompts), device=device).index_add(0, row, logp)


def answer_loss(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int, weights=None) -> torch.Tensor:
    """Mean over examples of the answer's negative log-likelihood: the loss sees the answer only,
    and it is the quantity that scoring ranks. `weights`: see weighted_mean."""
    return weighted_mean(-answer_logprobs(model, prompts, answers, pad_id), weights)


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


def classifier_loss(model, prompts: list[list[int]], targets: list[int], pad_id: int, weights=None) -> torch.Tensor:
    """An encoder classifier's loss: mean cross-entropy of its head over the labels."""
    ids, mask = right_pad(prompts, pad_id, device_of(model))
    logits = model(input_ids=ids, attention_mask=mask).logits
    losses = torch.nn.functional.cross_entropy(logits.float(), on_device(targets, ids.device), reduction="none")
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

    def loss(self, model, prompts, answers, pad_id: int, weights=None) -> torch.Tensor:
        return answer_loss(model, prompts, answers, pad_id, weights)

    def open(self, model, prompts: list[list[int]]) -> None:
        return None

    def scores(self, model, prompts, answers, pad_id: int, first_token: bool, prefix=None) -> torch.Tensor:
        return score_labels(model, prompts, answers, pad_id, first_token)
