"""Which rows go together: training batches, evaluation batches (by row count, the plain way,
or by tokens, a speed component) and the passes a training batch runs as."""

import math

import torch

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


def steps_per_epoch(n: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch of train_batches (length-sorted windows of batches)."""
    span = batch_size * SORT_WINDOW
    batches = sum(math.ceil(min(span, n - s) / batch_size) for s in range(0, n, span))
    return batches // grad_accum


def row_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """`batch_size` rows at a time, in order."""
    return [list(range(s, min(s + batch_size, len(lengths)))) for s in range(0, len(lengths), batch_size)]


def token_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Longest first (a too-large batch fails at once), cut by tokens: each batch holds about
    as many padded tokens as `batch_size` rows of the mean length (or `max_tokens`, a budget
    sized to the device), so long rows come a few at a time and short rows many at a time. A
    fixed row count would pad a batch of the long tail to its longest row (21 % waste at 32
    rows on MELD) and run short rows in small matmuls."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    budget = max_tokens or batch_size * sum(lengths) / max(len(lengths), 1)
    batches: list[list[int]] = []
    for i in order:
        # Sorted longest first, so a batch's width is its first row's length.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def passes(rows: list[int], width: int, max_tokens: int | None) -> list[list[int]]:
    """A batch's rows as one forward/backward pass, or, when their padded tokens (`width` per
    row) exceed max_tokens, as the fewest passes of equal rows that fit: memory then stays
    bounded by the long tail of utterances while the update is the batch's."""
    k = 1 if not max_tokens else max(1, math.ceil(len(rows) * width / max_tokens))
    size = math.ceil(len(rows) / min(k, len(rows)))
    return [rows[s : s + size] for s in range(0, len(rows), size)]
