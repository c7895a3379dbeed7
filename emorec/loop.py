"""The training loop and the two ways of predicting, as plain functions on token ids.

Unpacked batches are right-padded and carry no position ids, so every model (rotary or
absolute positions) and every PEFT method (including those that prepend virtual tokens) sees
each sequence at its natural positions; packed passes (below) give each row its positions
explicitly. Vocabulary logits are computed only where the loss or the score needs them
(`head_at`).

The prompts of a batch share a long first part (chat template, instruction, label list: about
30 of MELD's 47 prompt tokens), which runs once per batch. Where the model's attention goes
through transformers' AttentionInterface, the prefix and the rows run as one packed sequence
whose attention (`packed_attention`) keeps each row to the prefix and itself; otherwise the
prefix runs as a batch-of-one pass and its key/value cache is repeated for every row (in
training, gradients flow back through the repeat). Evaluation computes the prefix's cache once
for the whole set.
"""

import concurrent.futures
import contextlib
import copy
import math
import re
import threading
import time
import warnings
from typing import NamedTuple

import torch
from accelerate.utils import extract_model_from_parallel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from tqdm import tqdm
from transformers import AttentionInterface

from emorec.checkpoint import Interrupted
from emorec.distributed import rank_and_world
from emorec.errors import EmorecError


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of right-padded sequences."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


# The positions head_at gathers, per thread: evaluation streams (see predict) run the same model
# in several threads at once, so a hook registered per call would gather for all of them.
_head_rows = threading.local()


def _gather_head_rows(module, args):
    at = getattr(_head_rows, "at", None)
    if at is None or at[0] is not module:
        return None
    hidden, from_end = args[0], at[1]
    return (hidden[torch.arange(len(hidden))[:, None], hidden.shape[1] - from_end], *args[1:])


@contextlib.contextmanager
def head_at(model, from_end: torch.Tensor):
    """Inside (in this thread): the LM head runs only at the positions `from_end` (batch, span)
    of each row, counted from the end of the input (which virtual tokens do not shift), so
    logits are (batch, span, vocab). A pre-hook on the head gathers those rows of the final
    hidden states: this works for any model with an output embedding, and the model's own
    post-processing of the logits (scaling, soft-capping) still applies. The hook stays on the
    head and passes everything through outside this context."""
    head = base_of(model).get_output_embeddings()
    if not getattr(head, "_emorec_head_at", False):
        head.register_forward_pre_hook(_gather_head_rows)
        head._emorec_head_at = True
    before = getattr(_head_rows, "at", None)
    _head_rows.at = (head, from_end)
    try:
        yield
    finally:
        _head_rows.at = before


def tail_logits(model, ids, mask, lengths: torch.Tensor, span: int, **kwargs):
    """Logits at the `span` positions ending at each row's last real token, (batch, span, vocab),
    and the model output. Rows are right-padded to different lengths, so each row's positions
    differ: the head runs on exactly those (a small model's LM head over every position would be
    a large share of the cost)."""
    from_end = ids.shape[1] - (lengths[:, None] - span + torch.arange(span))
    with head_at(model, from_end):
        out = model(input_ids=ids, attention_mask=mask, **kwargs)
    return out.logits, out


# Batches per length-sorted window of train_batches (run.steps_per_epoch counts with it too).
SORT_WINDOW = 50


def train_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffled batches of similar length: sorting within windows of 50 batches cuts padding
    to a few percent while the data order stays random."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * SORT_WINDOW
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def eval_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Longest first (a too-large batch fails at once), cut by tokens: each batch holds about
    as many padded tokens as `batch_size` rows of the mean length, so long rows come a few at a
    time and short rows many at a time. A fixed row count would pad a batch of the long tail
    to its longest row (21 % waste at 32 rows on MELD) and run short rows in small matmuls."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    budget = batch_size * sum(lengths) / max(len(lengths), 1)
    batches: list[list[int]] = []
    for i in order:
        # Sorted longest first, so a batch's width is its first row's length.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


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


def prefix_length(model, prompts: list[list[int]], share: bool) -> int:
    return common_prefix(prompts) if share and can_share_prefix(model) else 0


def prefix_cache(model, prefix: list[int]):
    """The key/value cache of `prefix` at batch size 1 (the head runs at one position only)."""
    with head_at(model, torch.ones(1, 1, dtype=torch.long)):
        return model(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values


def shared_prefix(model, prompts: list[list[int]], share: bool, cached: tuple | None = None) -> tuple[int, dict]:
    """(length of the shared prefix, forward kwargs carrying its cache repeated per row); (0, {})
    when not sharing. The prefix runs once at batch size 1: gradients through the repeated
    cache sum over the rows, exactly as if each row had computed it. `cached`: a (length, cache)
    computed once for many batches (inference, where the weights do not change); it is copied,
    as the forward pass extends the cache in place."""
    if cached is not None:
        n, cache = cached[0], copy.deepcopy(cached[1])
    else:
        n = prefix_length(model, prompts, share)
        if n == 0:
            return 0, {}
        cache = prefix_cache(model, prompts[0][:n])
    cache.batch_repeat_interleave(len(prompts))
    return n, {"past_key_values": cache}


PACKED = "emorec_packed"


class Packing(NamedTuple):
    """The layout of a packed pass: `n` prefix tokens (0 when the prefix comes cached), then
    the rows. Padded layout (`index` None): the rows right-padded to one width, one after the
    other. Shared layout (see shared_rows): each distinct start of a row is one token, so rows
    that begin alike share those tokens; `index` (rows, width) holds each row's tokens among
    those after the prefix, padded by repeating its last one (padding comes after every real
    token of its row, so the causal mask alone hides it), and `keep` one place of every token
    in the (rows x width) layout, in token order. `prefix`: per layer, the (key, value) of a
    prefix computed before, each (kv heads, length, dim)."""

    n: int
    rows: int
    index: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    prefix: list | None = None


def shared_rows(seqs: list[list[int]], prefix: list | None = None) -> tuple[list[int], list[int], list[int], Packing]:
    """Rows as a token tree (a trie): (tokens, their positions within their row, each row's
    last token, the shared Packing layout). A token depends only on the tokens before it, so
    rows that start alike ("Oh, ...", "Yeah, ...", repeated utterances) compute their common
    start once: 4-8 % of the utterance tokens in MELD's length-sorted evaluation batches. Tokens
    are numbered as first met, row by row."""
    ids: dict[tuple[int, int], int] = {}
    tokens: list[int] = []
    depth: list[int] = []
    paths: list[list[int]] = []
    keep: list[tuple[int, int]] = []
    for r, seq in enumerate(seqs):
        node, path = -1, []
        for j, token in enumerate(seq):
            node = ids.setdefault((node, token), len(tokens))
            if node == len(tokens):
                tokens.append(token)
                depth.append(j)
                keep.append((r, j))
            path.append(node)
        paths.append(path)
    width = max(map(len, paths))
    index = torch.tensor([p + p[-1:] * (width - len(p)) for p in paths])
    places = torch.tensor([r * width + j for r, j in keep])
    return tokens, depth, [p[-1] for p in paths], Packing(0, len(seqs), index, places, prefix)


def packed_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, packed=None, **kwargs):
    """Attention over one packed sequence (see Packing): the prefix attends causally to itself,
    each row to the whole prefix and causally to itself, so no row sees another. The math is
    transformers' eager attention (scores in the input dtype, softmax in fp32). Query heads are
    grouped under the key/value head they share, so the prefix's keys are never repeated per
    row or head, and every row's scores against them come from one matmul per key/value head.
    query (1, heads, tokens, dim), key and value (1, kv heads, tokens, dim); returns
    (1, tokens, heads, dim)."""
    if kwargs.get("sliding_window") or kwargs.get("softcap") or (dropout and module.training):
        raise EmorecError("this model's attention has a window, soft-capping or dropout; set trainer.pack_prefix=false")
    n, rows, index, keep, cached = packed
    kv, total, dim = key.shape[1:]
    groups = query.shape[1] // kv
    low = torch.finfo(query.dtype).min
    q = query[0].unflatten(0, (kv, groups))  # (kv, groups, tokens, dim)
    k, v = key[0], value[0]  # (kv, tokens, dim)

    def causal(size):
        return torch.ones(size, size, dtype=torch.bool, device=query.device).triu(1)

    def softmax(scores):
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)

    outs = []
    if cached is not None:
        kp, vp = cached[module.layer_idx]
    else:
        kp, vp = k[:, :n], v[:, :n]
        own = torch.matmul(q[:, :, :n], kp.transpose(-1, -2).unsqueeze(1)) * scaling
        outs.append(torch.matmul(softmax(own.masked_fill(causal(n), low)), vp.unsqueeze(1)))
    prefix = kp.shape[1]
    # Every token's scores against the prefix: one matmul per key/value head.
    qf, kf, vf = q[:, :, n:], k[:, n:], v[:, n:]
    to_prefix = torch.matmul(qf.reshape(kv, -1, dim), kp.transpose(-1, -2)).view(kv, groups, -1, prefix) * scaling
    # Within rows, in the (rows, width) layout (gathered from the shared one), causal.
    if index is None:
        width = (total - n) // rows
        qr, to_prefix = qf.unflatten(2, (rows, width)), to_prefix.unflatten(2, (rows, width))
        kr, vr = kf.unflatten(1, (rows, width)).unsqueeze(1), vf.unflatten(1, (rows, width)).unsqueeze(1)
    else:
        width = index.shape[1]
        qr, to_prefix, kr, vr = qf[:, :, index], to_prefix[:, :, index], kf[:, None, index], vf[:, None, index]
    to_self = torch.matmul(qr, kr.transpose(-1, -2)) * scaling
    probs = softmax(torch.cat([to_prefix, to_self.masked_fill(causal(width), low)], -1))
    from_prefix = torch.matmul(probs[..., :prefix].reshape(kv, -1, prefix), vp).view(kv, groups, rows, width, dim)
    out_rows = (from_prefix + torch.matmul(probs[..., prefix:], vr)).flatten(2, 3)
    outs.append(out_rows if keep is None else out_rows[:, :, keep])
    out = torch.cat(outs, 2) if len(outs) > 1 else outs[0]  # (kv, groups, tokens, dim)
    return out.flatten(0, 1).transpose(0, 1).unsqueeze(0), None


AttentionInterface.register(PACKED, packed_attention)


def can_pack(model) -> bool:
    """Whether `packed_attention` computes this model's attention: a transformers model that
    dispatches attention through AttentionInterface, without windows, soft-capping or attention
    dropout, and no prompt-learning adapter (its virtual tokens would need a layout of their own)."""
    base = base_of(model)
    config = base.config
    # Per-layer kinds where the config lists them (Qwen2 keeps a sliding_window it does not use).
    kinds = getattr(config, "layer_types", None)
    windowed = any(t != "full_attention" for t in kinds) if kinds else bool(getattr(config, "sliding_window", None))
    unsupported = getattr(config, "attn_logit_softcapping", None) or getattr(config, "attention_dropout", 0.0)
    supported = getattr(base, "_supports_attention_backend", False) and can_share_prefix(model)
    return bool(supported) and not windowed and not unsupported


_implementations: dict[int, list] = {}  # id(config): [threads inside, implementation before]
_implementations_lock = threading.Lock()


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Inside: the model's attention layers dispatch to `name` (they read it from the config at
    every forward). Threads may enter it together with the same name (evaluation streams); the
    last one out restores the model's own."""
    config = base_of(model).config
    with _implementations_lock:
        entry = _implementations.setdefault(id(config), [0, config._attn_implementation])
        if entry[0] and config._attn_implementation != name:
            raise EmorecError(f"attention is {config._attn_implementation} in another thread; cannot switch to {name}")
        entry[0] += 1
        config._attn_implementation = name
    try:
        yield
    finally:
        with _implementations_lock:
            entry[0] -= 1
            if entry[0] == 0:
                config._attn_implementation = entry[1]
                del _implementations[id(config)]


def packed_answer_loss(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int, n: int) -> torch.Tensor:
    """answer_loss with the shared prefix of n tokens in the same pass as the rows (padded
    layout, see Packing): no separate batch-of-one pass for it, no key/value cache repeated per
    row, and no backward through the repeat. The head runs only where an answer token is
    predicted, not at the k positions every row would get in a (rows, k) layout. (The shared
    layout would also drop the few percent of padding that length-grouped batches have; it
    measured slower here, its gathers' backward being scatter-adds:
    experiments/bench/README.md.)"""
    seqs = [p[n:] + a for p, a in zip(prompts, answers)]
    ids, _ = right_pad(seqs, pad_id)
    rows, width = ids.shape
    flat = torch.cat([torch.tensor(prompts[0][:n]), ids.flatten()])[None]
    positions = torch.cat([torch.arange(n), n + torch.arange(width).repeat(rows)])[None]
    # Every answer token, as (row, column); the token before it predicts it (a row keeps at
    # least one token of its prompt after the prefix, see common_prefix).
    row = torch.tensor([r for r, a in enumerate(answers) for _ in a])
    col = torch.tensor([len(s) - len(a) + j for s, a in zip(seqs, answers) for j in range(len(a))])
    at = n + row * width + col - 1
    with attention_implementation(model, PACKED), head_at(model, flat.shape[1] - at[None]):
        logits = model(input_ids=flat, position_ids=positions, packed=Packing(n, rows)).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[row, col][:, None])
    return -logp.sum() / rows


def packed_last_logits(model, seqs: list[list[int]], n: int, prefix_kv: list) -> torch.Tensor:
    """(rows, vocab) logits at each row's last token, the rows' tokens in one pass without
    padding, their common starts computed once (shared_rows), after a cached prefix of n tokens
    (`prefix_kv`, see Packing)."""
    tokens, depth, last, layout = shared_rows(seqs, prefix_kv)
    flat = torch.tensor([tokens])
    positions = n + torch.tensor([depth])
    with attention_implementation(model, PACKED), head_at(model, len(tokens) - torch.tensor(last)[:, None]):
        return model(input_ids=flat, position_ids=positions, packed=layout).logits[:, 0]


def answer_loss(
    model,
    prompts: list[list[int]],
    answers: list[list[int]],
    pad_id: int,
    share_prefix: bool = True,
    pack: bool = True,
) -> torch.Tensor:
    """Mean over examples of the answer's negative log-likelihood (summed over its tokens):
    the loss sees the answer only, and it is the same quantity that scoring ranks. With
    `share_prefix`, the prompts' shared first tokens run once: inside the rows' pass with `pack`
    (where the model allows it, see can_pack), else as a batch-of-one pass whose key/value cache
    is repeated for every row."""
    if share_prefix and pack and can_pack(model) and (n := prefix_length(model, prompts, True)):
        return packed_answer_loss(model, prompts, answers, pad_id, n)
    n, cached = shared_prefix(model, prompts, share_prefix)
    seqs = [p[n:] + a for p, a in zip(prompts, answers)]
    ids, mask = right_pad(seqs, pad_id)
    k = max(map(len, answers))
    lengths = torch.tensor([len(s) for s in seqs])
    full_mask = torch.cat([torch.ones(len(seqs), n, dtype=mask.dtype), mask], 1)
    # The k positions before each row's end predict its last k tokens; only the last len(answer)
    # of them are answer tokens.
    logits, _ = tail_logits(model, ids, full_mask, lengths - 1, k, **cached)
    targets = ids[torch.arange(len(seqs))[:, None], lengths[:, None] - k + torch.arange(k)]
    is_answer = torch.arange(k) >= (k - torch.tensor([len(a) for a in answers]))[:, None]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    return -(logp * is_answer).sum(-1).mean()


def label_loss(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int, share_prefix: bool = False):
    """A sequence classifier's loss: mean cross-entropy of its head over the labels.
    `answers[i]` is [example i's label index], the classifier's one-step answer, so `train`
    runs both kinds of model alike. (`share_prefix` is ignored: an encoder attends both ways,
    so a shared first part is not computed independently of what follows it.)"""
    ids, mask = right_pad(prompts, pad_id)
    logits = model(input_ids=ids, attention_mask=mask).logits
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor([a[0] for a in answers]))


@torch.no_grad()
def classify(model, prompts: list[list[int]], pad_id: int) -> torch.Tensor:
    """(batch, labels) log-probabilities from a sequence classifier's head."""
    ids, mask = right_pad(prompts, pad_id)
    return torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)


def base_of(model):
    """The transformer under a PEFT wrapper. LoRA-style adapters live inside its modules;
    prompt-learning adapters act only through the wrapper's forward (prefix in the cache,
    virtual tokens in the input), so a continuation on their cache must bypass it. A
    data-parallel wrapper (DDP) is looked through."""
    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def first_tokens_differ(answers: list[list[int]]) -> bool:
    """Whether each label's answer starts with its own token, so that the first token decides."""
    return len({a[0] for a in answers}) == len(answers)


@torch.no_grad()
def score_labels(
    model,
    prompts: list[list[int]],
    answers: list[list[int]],
    pad_id: int,
    share_prefix: bool = True,
    first_token: bool = False,
    prefix: tuple | None = None,
    pack: bool = True,
) -> torch.Tensor:
    """(batch, labels) log-likelihood of each label's answer after each prompt; with
    `first_token`, of the answer's first token only.

    First-token scoring is greedy decoding constrained to the label set: when the labels' first
    tokens differ, the label whose first token the model ranks highest is the one a constrained
    generation would write. It needs one forward pass. Whole-answer scoring repeats the prompt's
    key/value cache once per label of several tokens and runs their remaining tokens on top.
    `prefix`: (length, cache) of a prefix all prompts share, computed once by the caller;
    with `pack` (and first-token scoring, on a model that allows it, see can_pack), the prompts
    then run in one pass on that cache, without padding and their common starts computed once
    (see shared_rows)."""
    if first_token and prefix is not None and pack and can_pack(model):
        n, cache = prefix
        kv = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
        last = packed_last_logits(model, [p[n:] for p in prompts], n, kv)
        return torch.log_softmax(last.float(), dim=-1)[:, [a[0] for a in answers]]
    n, cached = shared_prefix(model, prompts, share_prefix, prefix)
    ids, mask = right_pad([p[n:] for p in prompts], pad_id)
    lengths = torch.tensor([len(p) - n for p in prompts])
    full_mask = torch.cat([torch.ones(len(prompts), n, dtype=mask.dtype), mask], 1)
    rest = 0 if first_token else max(map(len, answers)) - 1
    last, out = tail_logits(model, ids, full_mask, lengths, 1, use_cache=rest > 0, **cached)
    first = torch.log_softmax(last[:, 0].float(), dim=-1)
    scores = first[:, [a[0] for a in answers]]
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
    cont = torch.full((k, rest + 1), pad_id, dtype=torch.long)
    for j, m in enumerate(multi):
        cont[j, : len(answers[m])] = torch.tensor(answers[m])
    cont_in, cont_target = cont[:, :-1].repeat(b, 1), cont[:, 1:].repeat(b, 1)
    cont_mask = (torch.arange(rest) < torch.tensor([len(answers[m]) - 1 for m in multi])[:, None]).repeat(b, 1)
    # The continuation sits after the padded prompt in the cache: the mask hides the padding and
    # the position ids carry on from each prompt's last real token.
    attention = torch.cat(
        [torch.ones(b * k, extra, dtype=torch.long), mask.repeat_interleave(k, 0), cont_mask.long()], 1
    )
    logits = base_of(model)(
        input_ids=cont_in,
        attention_mask=attention,
        position_ids=(extra + lengths).repeat_interleave(k)[:, None] + torch.arange(rest),
        past_key_values=cache,
    ).logits
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, cont_target[..., None]).squeeze(-1)
    scores[:, multi] += (logp * cont_mask).sum(-1).view(b, k)
    return scores


@contextlib.contextmanager
def merged_adapter(model):
    """Inside: LoRA-style adapters (LoRA, DoRA, IA3) folded into the base weights, so inference
    runs the plain model with no adapter matmuls or casts. On exit the base weights are restored
    bit for bit from a copy: unmerging by subtraction would leave bf16 rounding behind. Other
    models are left as they are."""
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, BaseTuner):
        yield
        return
    layers = [m.get_base_layer() for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [(p, p.detach().clone()) for layer in layers for p in layer.parameters(recurse=False)]
    tuner.merge_adapter()
    try:
        yield
    finally:
        with warnings.catch_warnings():  # IA3 warns that unmerging is inexact: the copy makes it exact
            warnings.simplefilter("ignore")
            tuner.unmerge_adapter()
        with torch.no_grad():
            for p, copy in saved:
                p.copy_(copy)


def parse_label(text: str, labels: list[str]) -> int:
    """The label named first in a generated text (whole words, any case); -1 if none is."""
    hits = [(m.start(), i) for i, lab in enumerate(labels) if (m := re.search(rf"\b{re.escape(lab)}\b", text, re.I))]
    return min(hits)[1] if hits else -1


@torch.no_grad()
def generate_labels(
    model, tokenizer, prompts: list[list[int]], labels: list[str], max_new_tokens: int
) -> tuple[list[int], list[str]]:
    """Greedy generation parsed into labels, as the paper evaluated. Left-padded, as
    `generate` expects."""
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [parse_label(t, labels) for t in texts], texts


@torch.no_grad()
def predict(
    model,
    tokenizer,
    prompts: list[list[int]],
    answers: list[list[int]],
    labels: list[str],
    *,
    mode: str = "score",
    batch_size: int = 32,
    autocast: bool = False,
    share_prefix: bool = True,
    first_token: bool = False,
    merge: bool = True,
    pack: bool = True,
    streams: int = 1,
    desc: str = "eval",
) -> dict:
    """Predictions for every prompt: label index (-1 when a generation names no label), the
    label-set probabilities (score mode; classify mode, a sequence classifier's head) or
    generated text (generate mode). `first_token`: score
    the answers' first tokens only (see score_labels); `merge`: fold the adapter into the
    weights while predicting (see merged_adapter); `pack`: see score_labels.

    `streams` (score and classify modes): batches run in that many threads at once, torch's
    intra-op threads shared out among them (2 streams of 1 thread on 2 cores). Each batch is
    then one thread's work from start to end: the cores do not meet at a barrier after every
    operation, and one stream's small operations and Python overhead overlap the other's
    matmuls. A batch's result does not depend on which stream ran it."""
    model.eval()
    preds = [0] * len(prompts)
    extra: list = [None] * len(prompts)
    start = time.perf_counter()
    device_type = model.device.type
    with merged_adapter(model) if merge else contextlib.nullcontext():
        # The prefix every prompt shares runs once for the whole set; batches are cut by the
        # tokens that run per row, those after it.
        n = prefix_length(model, prompts, share_prefix) if mode == "score" and prompts else 0
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            prefix = (n, prefix_cache(model, prompts[0][:n])) if n else None

        def run(batch: list[int]) -> tuple[list, list]:
            chunk = [prompts[i] for i in batch]
            # Grad mode and autocast are per thread: each stream sets its own.
            with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
                if mode == "generate":
                    return generate_labels(model, tokenizer, chunk, labels, max(map(len, answers)) + 8)
                if mode == "classify":
                    scores = classify(model, chunk, tokenizer.pad_token_id)
                else:
                    scores = score_labels(
                        model, chunk, answers, tokenizer.pad_token_id, share_prefix, first_token, prefix, pack
                    )
                probs = torch.softmax(scores, -1)
                return probs.argmax(-1).tolist(), probs.tolist()

        batches = eval_batches([len(p) - n for p in prompts], batch_size)
        with streamed(run, batches, streams if mode != "generate" else 1) as results:
            for batch, (out, more) in tqdm(zip(batches, results), total=len(batches), desc=desc, leave=False):
                for i, p, m in zip(batch, out, more):
                    preds[i], extra[i] = p, m
    seconds = time.perf_counter() - start
    return {"preds": preds, "extra": extra, "seconds": seconds, "examples_per_s": len(prompts) / seconds}


@contextlib.contextmanager
def streamed(fn, items: list, streams: int):
    """Inside: an iterator of fn(item) in order, computed in `streams` threads at once (at most
    one per intra-op thread) that share torch's intra-op threads (one stream: computed as
    iterated). On an error the items not started are dropped and the error reaches the caller."""
    threads = torch.get_num_threads()
    streams = min(streams, threads)
    if streams <= 1:
        yield map(fn, items)
        return
    pool = concurrent.futures.ThreadPoolExecutor(streams, thread_name_prefix="emorec-stream")
    torch.set_num_threads(max(1, threads // streams))
    try:
        yield pool.map(fn, items)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def passes(model, batch_prompts, lengths, batch: list[int], share_prefix: bool, max_tokens: int | None):
    """The batch as one forward/backward pass, or, when its padded tokens (after the shared
    prefix) exceed max_tokens, as the fewest passes of equal rows that fit: memory then stays
    bounded by the long tail of utterances while the update is the batch's."""
    n = prefix_length(model, batch_prompts, share_prefix)
    width = max(lengths[j] for j in batch) - n
    k = 1 if not max_tokens else max(1, math.ceil(len(batch) * width / max_tokens))
    size = math.ceil(len(batch) / min(k, len(batch)))
    return [batch[s : s + size] for s in range(0, len(batch), size)]


def pieces_of(rows: list[int], streams: int) -> list[list[int]]:
    """rows cut into at most `streams` runs of consecutive rows, as equal as can be."""
    k = min(streams, len(rows))
    return [rows[i * len(rows) // k : (i + 1) * len(rows) // k] for i in range(k)]


def draws_random(model) -> bool:
    """Whether a training forward draws random numbers (dropout): in several threads they would
    be drawn in whichever order the threads reach them."""
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def streamed_backward(run_piece, params: list, pieces: list[list[int]], scale: float) -> float:
    """The pass's rows as `pieces`, each one forward and backward in a thread of its own (see
    streamed): `run_piece(rows)` returns the rows' mean loss. Their gradients come back apart
    (autograd.grad, not .grad accumulated by two threads at once) and are added to .grad in
    piece order, so the sum does not depend on which thread finished first. Each gradient is
    that of the pass's mean loss times `scale`; returns that mean loss."""
    total = sum(map(len, pieces))

    def run(rows: list[int]) -> tuple[float, tuple]:
        weight = len(rows) / total
        loss = run_piece(rows)
        return loss.item() * weight, torch.autograd.grad(loss * (scale * weight), params, allow_unused=True)

    with streamed(run, pieces, len(pieces)) as results:
        results = list(results)
    for i, p in enumerate(params):
        for _, grads in results:
            if grads[i] is not None:
                p.grad = grads[i] if p.grad is None else p.grad + grads[i]
    return sum(loss for loss, _ in results)


def numerical_fault(what: str) -> EmorecError:
    return EmorecError(
        f"{what}; lower optimizer.lr or use trainer.precision=fp32 (the last checkpoint holds the weights before it)"
    )


def check_finite(params, step: int) -> None:
    if not all(torch.isfinite(p).all() for p in params):
        raise numerical_fault(f"weights are no longer finite after step {step}")


def train(
    model,
    prompts: list[list[int]],
    answers: list[list[int]],
    pad_id: int,
    *,
    optimizer,
    scheduler,
    steps: int,
    batch_size: int,
    grad_accum: int,
    max_grad_norm: float | None,
    autocast: bool,
    share_prefix: bool,
    seed: int,
    log_every: int,
    log,
    on_epoch_end,
    checkpoint=None,
    checkpoint_every: int = 0,
    stop=None,
    progress: dict | None = None,
    max_pass_tokens: int | None = None,
    accelerator=None,
    loss_fn=answer_loss,
    streams: int = 1,
) -> dict:
    """Train for `steps` optimizer steps over epochs of length-grouped batches. `answers[i]`
    is example i's answer, and `loss_fn` the loss of a pass (answer_loss, or label_loss for a
    sequence classifier); `log(metrics, step)` receives loss and learning rate;
    `on_epoch_end(epoch, step)` runs validation.

    `checkpoint(progress)` saves the run every `checkpoint_every` steps, at each epoch's end and
    when `stop()` names a signal (then training raises Interrupted). `progress` is this loop's
    own state (position in the data order, counters); passing a saved one continues from it.
    `max_pass_tokens` bounds the tokens of one forward/backward pass (see `passes`).

    With an `accelerator` of N processes (`model` then wrapped by it, e.g. in DDP), every process
    builds the same batches and process r trains on rows r, r+N, ... of each; the engine averages
    the gradients, so an optimizer step sees the same global batch as with one process.

    `streams`: each pass's rows run as that many pieces, each forward and backward in a thread
    of its own (see streamed_backward). Each piece computes the prompts' shared prefix again,
    but the threads never wait for each other between operations. One stream with an
    accelerator (its gradient exchange hooks into .grad accumulation) or with dropout."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    lengths = [len(p) + len(a) for p, a in zip(prompts, answers)]
    p = progress or {}
    step, epoch, first = p.get("step", 0), p.get("epoch", 0), p.get("batch", 0)
    tokens, computed, examples = p.get("tokens", 0), p.get("computed_tokens", 0), p.get("examples", 0)
    losses, running, before = list(p.get("losses", [])), list(p.get("running", [])), p.get("seconds", 0.0)
    if "generator" in p:
        generator.set_state(p["generator"])
    paused, start = 0.0, time.perf_counter()
    rank, world = rank_and_world(accelerator)
    device_type = extract_model_from_parallel(model).device.type
    # Pieces beyond one per intra-op thread would only run the prefix again.
    streams = 1 if accelerator is not None or draws_random(model) else min(streams, torch.get_num_threads())

    def agree(values: list[float]) -> list[float]:
        # Sums over processes: each holds its rows' share of a loss, or a signal flag.
        if world == 1:
            return values
        return accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=accelerator.device), "sum").tolist()

    def state(batch: int, epoch_generator: torch.Tensor) -> dict:
        # Where to continue: the epoch's batches come again from the generator state at its
        # start, and `batch` is the first one not yet trained on.
        return {
            "step": step,
            "epoch": epoch,
            "batch": batch,
            "generator": epoch_generator,
            "tokens": tokens,
            "computed_tokens": computed,
            "examples": examples,
            "losses": losses,
            "running": running,
            "seconds": before + time.perf_counter() - start - paused,
        }

    def piece_loss(rows: list[int]) -> torch.Tensor:
        # Autocast is per thread: each stream sets its own.
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            return loss_fn(model, [prompts[j] for j in rows], [answers[j] for j in rows], pad_id, share_prefix)

    bar = tqdm(total=steps, initial=step, desc="train", disable=rank > 0)
    while step < steps:
        model.train()
        epoch_generator = generator.get_state()
        batches = train_batches(lengths, batch_size, generator)
        # Drop a last partial accumulation group, so every optimizer step sees the same batch.
        usable = len(batches) - len(batches) % grad_accum
        for i in range(first, usable, grad_accum):
            # This process's passes of the step: (batch in the group, rows, share of the batch).
            work = []
            for b, batch in enumerate(batches[i : i + grad_accum]):
                for r in range(world):
                    rows = batch[r::world]
                    if not rows:
                        continue
                    for part in passes(model, [prompts[j] for j in rows], lengths, rows, share_prefix, max_pass_tokens):
                        if r == rank:
                            work.append((b, part, len(part) / len(batch)))
                        for piece in pieces_of(part, streams):
                            piece_tokens = sum(lengths[j] for j in piece)
                            tokens += piece_tokens
                            # Tokens the model actually ran (for FLOPs): the shared prefix once per piece.
                            n = prefix_length(model, [prompts[j] for j in piece], share_prefix)
                            computed += piece_tokens - (len(piece) - 1) * n
                examples += len(batch)
            if not work:
                # Fewer rows than processes: a pass of weight 0 keeps this one in the gradient exchange.
                work.append((0, batches[i][:1], 0.0))
            group = [0.0] * grad_accum
            for k, (b, part, share) in enumerate(work):
                # Each pass's mean loss, weighted by its share of the batch: the gradients add up
                # to those of the batch's mean loss (times N, as the engine averages them).
                scale = share * world / grad_accum
                if streams > 1:
                    group[b] += streamed_backward(piece_loss, params, pieces_of(part, streams), scale) * share
                    continue
                # Gradients are exchanged once per step, on each process's last pass.
                sync = accelerator is None or k == len(work) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    loss = piece_loss(part)
                    accelerator.backward(loss * scale) if accelerator else (loss * scale).backward()
                group[b] += loss.item() * share
            group = agree(group)
            loss_value = sum(group) / grad_accum
            if not math.isfinite(loss_value):
                # Before the update: the weights, and the last checkpoint, stay good.
                raise numerical_fault(f"loss is {loss_value} at step {step + 1}")
            losses.append(loss_value)
            running += group
            if max_grad_norm:
                norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                if not torch.isfinite(norm):
                    raise numerical_fault(f"gradient norm is {norm.item()} at step {step + 1}")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update()
            if step % log_every == 0 or step == steps:
                mean = sum(running) / len(running)
                running = []
                bar.set_postfix(loss=f"{mean:.4f}")
                log(
                    {"train/loss": mean, "train/lr": scheduler.get_last_lr()[0], "train/epoch": epoch + i / usable},
                    step,
                )
            signal_name = stop() if stop else None
            if world > 1 and agree([float(signal_name is not None)])[0]:
                # All processes stop at the same step (a signal may reach them at different ones).
                signal_name = signal_name or "SIGTERM"
            if checkpoint and (signal_name or (checkpoint_every and step % checkpoint_every == 0)):
                check_finite(params, step)  # a checkpoint is never written with broken weights
                path = checkpoint(state(i + grad_accum, epoch_generator))
                if signal_name:
                    bar.close()
                    raise Interrupted(signal_name, step, path)
            if step >= steps:
                break
        first = 0
        epoch += 1
        pause = time.perf_counter()
        on_epoch_end(epoch, step)
        paused += time.perf_counter() - pause  # validation time is not training time
        if checkpoint:
            check_finite(params, step)
            checkpoint(state(0, generator.get_state()))
    bar.close()
    seconds = before + time.perf_counter() - start - paused
    return {
        "steps": step,
        "epochs": epoch,
        "seconds": seconds,
        "examples": examples,
        "tokens": tokens,  # prompt and answer tokens of the examples trained on
        "computed_tokens": computed,  # tokens the model ran (the shared prefix once per pass)
        "examples_per_s": examples / seconds if seconds else 0.0,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "losses": losses,  # one per optimizer step
    }
