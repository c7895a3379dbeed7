"""The packed pass: the shared prompt prefix and a batch's rows as one sequence, whose attention
(`packed_attention`) keeps each row to the prefix and itself, so no row sees another. No
batch-of-one pass for the prefix, no key/value cache repeated per row, no backward through the
repeat. For evaluation (first-token scoring) the rows run concatenated without padding on the
prefix's cache, rows that start alike computing their common start once (`shared_rows`).

It serves models whose attention transformers dispatches through its AttentionInterface
(Llama, Qwen2, GLM, ...), without windows, soft-capping or attention dropout (`can_pack`).
"""

import threading
from contextlib import contextmanager
from typing import NamedTuple

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from emorec.errors import EmorecError
from emorec.fast.lm_head import HeadAt
from emorec.fast.prefix import PrefixCache, can_share_prefix
from emorec.reference import target_logp, weighted_mean
from emorec.tensors import base_of, device_of, on_device, right_pad


class Packing(NamedTuple):
    """The layout of a packed pass: `n` prefix tokens (0 when the prefix comes cached), then
    the rows. Padded layout (`index` None): the rows right-padded to one width, one after the
    other. Shared layout (see shared_rows): each distinct start of a row is one token, so rows
    that begin alike share those tokens; `index` (rows, width) holds each row's tokens among
    those after the prefix, padded by repeating its last one (padding comes after every real
    token of its row, so the causal mask alone hides it), and `keep` one place of every token
    in the (rows x width) layout, in token order. `prefix`: per layer, the (key, value) of a
    prefix computed before, each (kv heads, length, dim). `mask`: for packed_sdpa_attention,
    which keys each token sees, (tokens, cached prefix + tokens), True where it attends; for
    packed_flex_attention, a BlockMask (emorec.fast.static makes both from its row ids)."""

    n: int
    rows: int
    index: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    prefix: list | None = None
    mask: object = None


def shared_rows(
    seqs: list[list[int]], prefix: list | None = None, device=None
) -> tuple[list[int], list[int], list[int], Packing]:
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
    index = on_device([p + p[-1:] * (width - len(p)) for p in paths], device)
    places = on_device([r * width + j for r, j in keep], device)
    return tokens, depth, [p[-1] for p in paths], Packing(0, len(seqs), index, places, prefix)


def packed_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, packed=None, **kwargs):
    """Attention over one packed sequence (see Packing): the prefix attends causally to itself,
    each row to the whole prefix and causally to itself. The math is transformers' eager
    attention (scores in the input dtype, softmax in fp32), the query scaled before the
    matmuls. Query heads are grouped under the key/value head they share, so the prefix's keys
    are never repeated per row or head, and every row's scores against them come from one
    matmul per key/value head.
    query (1, heads, tokens, dim), key and value (1, kv heads, tokens, dim); returns
    (1, tokens, heads, dim)."""
    if kwargs.get("sliding_window") or kwargs.get("softcap") or (dropout and module.training):
        raise EmorecError("this model's attention has a window, soft-capping or dropout; set fast.pack=false")
    n, rows, index, keep, cached, _ = packed
    kv, total, dim = key.shape[1:]
    groups = query.shape[1] // kv
    # Scaled once here rather than each block of scores after its matmul: one op, not three.
    q = (query[0] * scaling).unflatten(0, (kv, groups))  # (kv, groups, tokens, dim)
    k, v = key[0], value[0]  # (kv, tokens, dim)

    def causal(size):
        return torch.ones(size, size, dtype=torch.bool, device=query.device).triu(1)

    def masked(scores, mask):  # the scores' own lowest value (under autocast, not the query's dtype)
        return scores.masked_fill(mask, torch.finfo(scores.dtype).min)

    def softmax(scores):
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)

    outs = []
    if cached is not None:
        kp, vp = cached[module.layer_idx]
        qf, kf, vf = q, k, v
    else:
        # Split, not sliced: a split's backward is one concatenation, two slices' are two
        # zero-filled copies and a sum.
        (qp, qf), (kp, kf), (vp, vf) = (
            q.split([n, total - n], 2),
            k.split([n, total - n], 1),
            v.split([n, total - n], 1),
        )
        own = torch.matmul(qp, kp.transpose(-1, -2).unsqueeze(1))
        outs.append(torch.matmul(softmax(masked(own, causal(n))), vp.unsqueeze(1)))
    prefix = kp.shape[1]
    # Every token's scores against the prefix: one matmul per key/value head.
    to_prefix = torch.matmul(qf.reshape(kv, -1, dim), kp.transpose(-1, -2)).view(kv, groups, -1, prefix)
    # Within rows, in the (rows, width) layout (gathered from the shared one), causal.
    if index is None:
        width = (total - n) // rows
        qr, to_prefix = qf.unflatten(2, (rows, width)), to_prefix.unflatten(2, (rows, width))
        kr, vr = kf.unflatten(1, (rows, width)).unsqueeze(1), vf.unflatten(1, (rows, width)).unsqueeze(1)
    else:
        width = index.shape[1]
        qr, to_prefix, kr, vr = qf[:, :, index], to_prefix[:, :, index], kf[:, None, index], vf[:, None, index]
    to_self = torch.matmul(qr, kr.transpose(-1, -2))
    probs = softmax(torch.cat([to_prefix, masked(to_self, causal(width))], -1))
    from_prefix = torch.matmul(probs[..., :prefix].reshape(kv, -1, prefix), vp).view(kv, groups, rows, width, dim)
    out_rows = (from_prefix + torch.matmul(probs[..., prefix:], vr)).flatten(2, 3)
    outs.append(out_rows if keep is None else out_rows[:, :, keep])
    out = torch.cat(outs, 2) if len(outs) > 1 else outs[0]  # (kv, groups, tokens, dim)
    return out.flatten(0, 1).transpose(0, 1).unsqueeze(0), None


def padded_mask(n: int, rows: int, width: int, device) -> torch.Tensor:
    """The packed pass's attention in the padded layout as a mask: every token sees the keys
    before it that are in the prefix or in its own row."""
    row = torch.cat([torch.full((n,), -1, device=device), torch.arange(rows, device=device).repeat_interleave(width)])
    at = torch.arange(len(row), device=device)
    return (at[None] <= at[:, None]) & ((row[None] == -1) | (row[None] == row[:, None]))


def shared_mask(prefix: int, index: torch.Tensor, tokens: int) -> torch.Tensor:
    """... in the shared layout after a cached prefix: every token sees the prefix, itself and
    the tokens before it on its row's path (index: each row's tokens, see Packing)."""
    mask = torch.zeros(tokens, prefix + tokens, dtype=torch.bool, device=index.device)
    mask[:, :prefix] = True
    # Each row's (query, key) pairs with the key at or before the query: index pairs, not a
    # boolean selection, whose size the host would have to wait for.
    query, key = torch.tril_indices(index.shape[1], index.shape[1], device=index.device)
    mask[index[:, query], prefix + index[:, key]] = True
    return mask


def packed_sdpa_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, packed=None, **kwargs):
    """packed_attention through torch's fused scaled_dot_product_attention and `packed.mask`,
    for GPUs: one kernel per layer, where the grouped matmuls of packed_attention are many small
    launches. Its masked-out blocks (rows against each other) cost little at emorec's lengths:
    the attention's FLOPs are a few percent of the projections'. Same shapes as packed_attention."""
    if kwargs.get("sliding_window") or kwargs.get("softcap") or (dropout and module.training):
        raise EmorecError("this model's attention has a window, soft-capping or dropout; set fast.pack=false")
    if packed.prefix is not None:
        kp, vp = packed.prefix[module.layer_idx]
        key, value = torch.cat([kp[None].to(key.dtype), key], 2), torch.cat([vp[None].to(value.dtype), value], 2)
    # Keys repeated per query head rather than enable_gqa, which rules out the memory-efficient
    # kernel that an explicit mask needs.
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=packed.mask, scale=scaling)
    return out.transpose(1, 2), None


def packed_flex_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, packed=None, **kwargs):
    """Attention through FlexAttention and `packed.mask`, a BlockMask (emorec.fast.static):
    compiled, one fused kernel per layer that skips the blocks of rows against each other, with
    no dense mask and no per-shape plan. (Eager, it materialises the scores; and it has no CPU
    backward in torch 2.13.) Same shapes as packed_attention; no cached prefix."""
    if kwargs.get("sliding_window") or kwargs.get("softcap") or (dropout and module.training):
        raise EmorecError("this model's attention has a window, soft-capping or dropout; set fast.pack=false")
    from torch.nn.attention.flex_attention import flex_attention

    out = flex_attention(query, key, value, block_mask=packed.mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2), None


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


class PackedAttention:
    """`with attention.packed():` the model's attention layers dispatch to packed_attention
    (they read the implementation's name from the config at every forward). The function is
    registered with transformers under a name of this object's own while some thread is inside,
    and the model's own implementation comes back when the last one leaves; threads may enter
    together (evaluation and training streams)."""

    def __init__(self, model, function=packed_attention):
        self.config, self.function = base_of(model).config, function
        self.name = f"emorec_packed_{id(self)}"
        self.lock = threading.Lock()
        self.inside, self.before = 0, None

    @contextmanager
    def packed(self):
        with self.lock:
            if self.inside == 0:
                AttentionInterface.register(self.name, self.function)
                self.before, self.config._attn_implementation = self.config._attn_implementation, self.name
            self.inside += 1
        try:
            yield
        finally:
            with self.lock:
                self.inside -= 1
                if self.inside == 0:
                    self.config._attn_implementation = self.before
                    del ALL_ATTENTION_FUNCTIONS._global_mapping[self.name]


class Packed:
    """The answer loss and first-token scores through the packed pass. Batches whose prompts
    share no prefix take `fallback` (the batch-of-one prefix path). `fused`: attention through
    packed_sdpa_attention (GPUs) instead of packed_attention (CPUs)."""

    def __init__(self, model, head: HeadAt, fallback: PrefixCache, fused: bool = False):
        self.attention = PackedAttention(model, packed_sdpa_attention if fused else packed_attention)
        self.head, self.fallback, self.fused = head, fallback, fused

    def shared_length(self, model, prompts: list[list[int]]) -> int:
        return self.fallback.shared_length(model, prompts)

    def loss(self, model, prompts, answers, pad_id: int, weights=None, smoothing: float = 0.0) -> torch.Tensor:
        """reference.answer_loss in one packed pass (padded layout). The head runs only where an
        answer token is predicted. (The shared layout would also drop the few percent of padding
        that length-grouped batches have; it measured slower here, its gathers' backward being
        scatter-adds: experiments/bench/README.md.)"""
        n = self.shared_length(model, prompts)
        if n == 0:
            return self.fallback.loss(model, prompts, answers, pad_id, weights, smoothing)
        device = device_of(model)
        seqs = [p[n:] + a for p, a in zip(prompts, answers)]
        ids, _ = right_pad(seqs, pad_id, device)
        rows, width = ids.shape
        flat = torch.cat([on_device(prompts[0][:n], device), ids.flatten()])[None]
        positions = torch.cat([torch.arange(n, device=device), n + torch.arange(width, device=device).repeat(rows)])
        # Every answer token, as (row, column); the token before it predicts it (a row keeps at
        # least one token of its prompt after the prefix, see common_prefix).
        row = on_device([r for r, a in enumerate(answers) for _ in a], device)
        col = on_device([len(s) - len(a) + j for s, a in zip(seqs, answers) for j in range(len(a))], device)
        at = n + row * width + col - 1
        layout = Packing(n, rows, mask=padded_mask(n, rows, width, device) if self.fused else None)
        with self.attention.packed():
            logits, _ = self.head.run(
                model,
                flat.shape[1] - at[None],
                input_ids=flat,
                position_ids=positions[None],
                packed=layout,
                use_cache=False,  # else each layer's keys and values are copied into a new cache
            )
        logp = target_logp(logits[0], ids[row, col], smoothing)
        return weighted_mean(-torch.zeros(rows, device=device).index_add(0, row, logp), weights)

    def open(self, model, prompts: list[list[int]]) -> tuple | None:
        return self.fallback.open(model, prompts)

    @torch.no_grad()
    def scores(self, model, prompts, answers, pad_id: int, first_token: bool, prefix: tuple | None = None):
        """First-token scores: each row's logits at its last token, the rows' tokens in one pass
        without padding, their common starts computed once, after the cached prefix."""
        if not first_token or prefix is None:
            return self.fallback.scores(model, prompts, answers, pad_id, first_token, prefix)
        n, cache = prefix
        kv = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
        device = device_of(model)
        tokens, depth, last, layout = shared_rows([p[n:] for p in prompts], kv, device)
        flat, positions = on_device([tokens], device), n + on_device([depth], device)
        if self.fused:
            layout = layout._replace(mask=shared_mask(n, layout.index, len(tokens)))
        with self.attention.packed():
            from_end = len(tokens) - on_device(last, device)[:, None]
            logits, _ = self.head.run(
                model, from_end, input_ids=flat, position_ids=positions, packed=layout, use_cache=False
            )
        return torch.log_softmax(logits[:, 0].float(), dim=-1)[:, [a[0] for a in answers]]
