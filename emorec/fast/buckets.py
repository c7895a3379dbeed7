"""Shape buckets: the few lengths a static training pass runs at.

A compiled step is compiled once per input shape, and a GPU builds one attention plan per
shape, so a step whose shape follows each batch (32-59 shapes per epoch here:
experiments/shapes) pays those costs all epoch. A static pass is one packed sequence: the
task's shared prefix, then its rows one after the other without padding between them, then
padding up to one of a few lengths (its bucket). The buckets are chosen from the training set's
own passes (16 epochs drawn as training draws them): the list of at most `most` multiples of
`multiple` that wastes the fewest tokens (dynamic programming over the passes' lengths), its
last entry the longest pass drawn; and one more, the longest pass possible, which an epoch
rarely meets, so that no pass ever runs at a length of its own.
"""

import bisect
import math
from collections import Counter
from dataclasses import dataclass

import torch

from emorec.batches import passes, train_batches
from emorec.errors import EmorecError


def round_up(value: int, multiple: int) -> int:
    return multiple * math.ceil(value / multiple)


def choose_lengths(lengths: Counter, most: int, multiple: int = 8) -> tuple[int, ...]:
    """At most `most` bucket lengths (multiples of `multiple`) for passes of these lengths
    (`lengths[t]`: how often a pass of t tokens runs), wasting the fewest padded tokens; the
    longest is always one of them."""
    if not lengths or most < 1:
        raise EmorecError("shape buckets need at least one bucket and one training pass; set fast.buckets >= 1")
    # Each pass runs at least at its length rounded up: candidates are those rounded lengths.
    often = Counter()
    for t, times in lengths.items():
        often[round_up(t, multiple)] += times
    edges = sorted(often)
    m = len(edges)
    if m <= most:
        return tuple(edges)
    # cost(i, j): edges[i..j] all run at edges[j]. best[k][j]: least waste covering edges[..j]
    # with k buckets, the last at edges[j].
    count, total = [0], [0]  # prefix sums of passes and of their tokens
    for e in edges:
        count.append(count[-1] + often[e])
        total.append(total[-1] + often[e] * e)

    def cost(i: int, j: int) -> int:
        return edges[j] * (count[j + 1] - count[i]) - (total[j + 1] - total[i])

    best = [[math.inf] * m for _ in range(most + 1)]
    back = [[-1] * m for _ in range(most + 1)]
    for j in range(m):
        best[1][j] = cost(0, j)
    for k in range(2, most + 1):
        for j in range(m):
            for i in range(j):
                waste = best[k - 1][i] + cost(i + 1, j)
                if waste < best[k][j]:
                    best[k][j], back[k][j] = waste, i
    k = min(range(1, most + 1), key=lambda k: best[k][m - 1])
    chosen, j = [], m - 1
    while j >= 0 and k >= 1:
        chosen.append(edges[j])
        j, k = back[k][j], k - 1
    return tuple(sorted(chosen))


EPOCHS_DRAWN = 16  # epochs whose passes' lengths the buckets are chosen from


@dataclass(frozen=True)
class Buckets:
    """The static shapes of a task's training passes: `prefix`, the tokens every training prompt
    shares (first in every pass); `lengths`, the lengths a pass's packed sequence is padded to;
    `rows`, the rows every pass is given (a process's share of a batch: a row beyond a pass's
    own has no tokens and weighs 0); `slots`, the answer tokens each row is given (the longest
    answer's; unused ones weigh 0)."""

    prefix: tuple[int, ...]
    lengths: tuple[int, ...]
    rows: int
    slots: int

    def length(self, tokens: int) -> int:
        """The length a pass of `tokens` runs at (a longer one than any bucket runs as it is)."""
        i = bisect.bisect_left(self.lengths, tokens)
        return self.lengths[i] if i < len(self.lengths) else tokens

    def describe(self) -> dict:
        return {"prefix": len(self.prefix), "lengths": list(self.lengths), "rows": self.rows, "slots": self.slots}


def pass_tokens(lengths: list[int], n: int, rows: list[int]) -> int:
    """The tokens of a packed pass over `rows`: the prefix of `n` once, each row's own after it."""
    return n + sum(lengths[j] - n for j in rows)


def plan_buckets(
    lengths: list[int], prefix: list[int], answer_lengths: list[int], batch_size: int, options: tuple
) -> Buckets:
    """Buckets for training examples of `lengths` tokens (prompt and answer) that share
    `prefix`, run in batches of `batch_size` rows (split into passes of at most `max_tokens`
    padded tokens as batches.passes splits them), the passes of EPOCHS_DRAWN epochs drawn as
    emorec.batches draws them. `options`: (most buckets, multiple, max_tokens or None)."""
    most, multiple, max_tokens = options
    n = len(prefix)
    totals = Counter()
    for seed in range(EPOCHS_DRAWN):
        for batch in train_batches(lengths, batch_size, torch.Generator().manual_seed(seed)):
            for rows in passes(batch, max(lengths[j] for j in batch) - n, max_tokens):
                totals[pass_tokens(lengths, n, rows)] += 1
    chosen = choose_lengths(totals, most, multiple)
    # One more for the longest pass any epoch could draw (the longest rows together), so that
    # no pass ever runs at a length of its own: an epoch rarely meets it (it is longer than all
    # the passes of EPOCHS_DRAWN epochs).
    longest = sorted(lengths)[-batch_size:]
    rows = len(passes(list(range(len(longest))), longest[-1] - n, max_tokens)[0])
    cap = round_up(n + sum(t - n for t in longest[-rows:]), multiple)
    chosen += (cap,) if cap > chosen[-1] else ()
    return Buckets(tuple(prefix), chosen, batch_size, max(answer_lengths))
