"""Prefix sharing: the prompts of a batch share a long first part (chat template, instruction,
label list: about 30 of MELD's 47 prompt tokens), which need not run once per row.

Here the prefix runs as a batch-of-one pass whose key/value cache is repeated for every row (in
training, gradients flow back through the repeat and sum over the rows, exactly as if each row
had computed it); evaluation computes it once for the whole set. The LM head runs only at the
positions the loss or the scores need (HeadAt). With share=False this is the same computation
without a prefix: the head-at-positions path alone.
"""

import copy

import torch
from accelerate.utils import extract_model_from_parallel

from emorec.fast.lm_head import HeadAt
from emorec.reference import target_logp, weighted_mean
from emorec.tensors import base_of, device_of, on_device, right_pad


def common_prefix(prompts: list[list[int]]) -> int:
    """Length of the token prefix every prompt shares, leaving each at least its last token
    (whose logits predict the answer)."""
    first, limit = prompts[0], min(map(len, prompts)) - 1
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def can_share_prefix(model) -> bool:
    """Prompt-learning adapters put virtual tokens or their own prefix cache before the input,
    so a cache of real tokens cannot go first there."""
    config = getattr(extract_model_from_parallel(model), "active_peft_config", None)
    return config is None or not config.is_prompt_learning


def copied(cache):
    """A copy of a key/value cache, its tensors cloned (a forward pass extends a cache's layers
    in place). Layer by layer rather than copy.deepcopy, which copies a tensor's storage outside
    the tensor's own operations (and fails on fake tensors, test_device)."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in new.layers:
        if getattr(layer, "keys", None) is not None:
            layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
    return new


class PrefixCache:
    """The answer loss and label scores with the shared prefix run once per batch (or per
    evaluation set) at batch size 1, its cache repeated for every row."""

    def __init__(self, head: HeadAt, share: bool = True):
        self.head, self.share = head, share

    def shared_length(self, model, prompts: list[list[int]]) -> int:
        """Tokens of `prompts` that run once for all of them."""
        return common_prefix(prompts) if self.share and can_share_prefix(model) else 0

    def cache(self, model, prefix: list[int]):
        """The key/value cache of `prefix` at batch size 1 (the head runs at one position only)."""
        one = torch.ones(1, 1, dtype=torch.long, device=device_of(model))
        _, out = self.head.run(model, one, input_ids=on_device([prefix], device_of(model)), use_cache=True)
        return out.past_key_values

    def repeated(self, model, prompts: list[list[int]], cached: tuple | None = None) -> tuple[int, dict]:
        """(length of the shared prefix, forward kwargs carrying its cache repeated per row);
        (0, {}) when not sharing. `cached`: a (length, cache) computed once for many batches
        (inference, where the weights do not change); it is copied, as the forward pass extends
        the cache in place."""
        if cached is not None:
            n, cache = cached[0], copied(cached[1])
        else:
            n = self.shared_length(model, prompts)
            if n == 0:
                return 0, {}
            cache = self.cache(model, prompts[0][:n])
        cache.batch_repeat_interleave(len(prompts))
        return n, {"past_key_values": cache}

    def loss(self, model, prompts, answers, pad_id: int, weights=None, smoothing: float = 0.0) -> torch.Tensor:
        """reference.answer_loss, the head at the last k positions of each row only."""
        device = device_of(model)
        n, cached = self.repeated(model, prompts)
        seqs = [p[n:] + a for p, a in zip(prompts, answers)]
        ids, mask = right_pad(seqs, pad_id, device)
        k = max(map(len, answers))
        lengths = on_device([len(s) for s in seqs], device)
        full_mask = torch.cat([torch.ones(len(seqs), n, dtype=mask.dtype, device=device), mask], 1)
        # The k positions before each row's end predict its last k tokens; only the last
        # len(answer) of them are answer tokens.
        logits, _ = self.head.tail_logits(model, ids, full_mask, lengths - 1, k, **cached)
        span = torch.arange(k, device=device)
        targets = ids[torch.arange(len(seqs), device=device)[:, None], lengths[:, None] - k + span]
        is_answer = span >= (k - on_device([len(a) for a in answers], device))[:, None]
        logp = target_logp(logits, targets, smoothing)
        return weighted_mean(-(logp * is_answer).sum(-1), weights)

    def open(self, model, prompts: list[list[int]]) -> tuple | None:
        """The (length, cache) of the prefix all of an evaluation set's prompts share, or None."""
        n = self.shared_length(model, prompts) if prompts else 0
        return (n, self.cache(model, prompts[0][:n])) if n else None

    @torch.no_grad()
    def scores(self, model, prompts, answers, pad_id: int, first_token: bool, prefix: tuple | None = None):
        """reference.score_labels. Whole-answer scoring repeats the prompt's key/value cache once
        per label of several tokens and runs their remaining tokens on top; first-token scoring
        needs one forward pass. `prefix`: see open."""
        device = device_of(model)
        n, cached = self.repeated(model, prompts, prefix)
        ids, mask = right_pad([p[n:] for p in prompts], pad_id, device)
        lengths = on_device([len(p) - n for p in prompts], device)
        full_mask = torch.cat([torch.ones(len(prompts), n, dtype=mask.dtype, device=device), mask], 1)
        rest = 0 if first_token else max(map(len, answers)) - 1
        last, out = self.head.tail_logits(model, ids, full_mask, lengths, 1, use_cache=rest > 0, **cached)
        scores = torch.log_softmax(last[:, 0].float(), dim=-1)[:, [a[0] for a in answers]]
        if rest == 0:
            return scores
        # Only labels of several tokens need the prompt's cache and a second pass.
        multi = [j for j, a in enumerate(answers) if len(a) > 1]
        b, k = len(prompts), len(multi)
        cache = out.past_key_values
        # Cached positions before the padded rows: the shared prefix, or the virtual tokens a
        # prompt-learning adapter added.
        extra = cache.get_seq_length() - ids.shape[1]
        cache.batch_repeat_interleave(k)  # row i*k + j: prompt i followed by answer multi[j]
        cont, _ = right_pad([answers[m] + [pad_id] * (rest + 1 - len(answers[m])) for m in multi], pad_id, device)
        cont_in, cont_target = cont[:, :-1].repeat(b, 1), cont[:, 1:].repeat(b, 1)
        wanted = on_device([len(answers[m]) - 1 for m in multi], device)
        cont_mask = (torch.arange(rest, device=device) < wanted[:, None]).repeat(b, 1)
        # The continuation sits after the padded prompt in the cache: the mask hides the padding
        # and the position ids carry on from each prompt's last real token.
        attention = torch.cat(
            [
                torch.ones(b * k, extra, dtype=torch.long, device=device),
                mask.repeat_interleave(k, 0),
                cont_mask.long(),
            ],
            1,
        )
        logits = base_of(model)(
            input_ids=cont_in,
            attention_mask=attention,
            position_ids=(extra + lengths).repeat_interleave(k)[:, None] + torch.arange(rest, device=device),
            past_key_values=cache,
        ).logits
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, cont_target[..., None]).squeeze(-1)
        scores[:, multi] += (logp * cont_mask).sum(-1).view(b, k)
        return scores
