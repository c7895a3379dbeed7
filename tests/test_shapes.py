"""experiments/shapes (issue 38's baseline): the pass shapes and padding of an epoch, counted
from the engine's own batching and prefix rule, checked on prompts whose answer is known."""

from experiments.shapes.shapes import epoch_shapes, evaluation_shapes, static_shapes


def test_one_batch_of_16_rows_sharing_a_prefix_of_3():
    # Row k: the prefix [1, 2, 3], then k + 1 tokens of its own; one answer token each.
    prompts = [[1, 2, 3] + [10 + k] * (k + 1) for k in range(16)]
    lengths = [len(p) + 1 for p in prompts]
    own = sum(n - 3 for n in lengths)  # 16 rows of 2..17 tokens after the prefix
    gpu = epoch_shapes(prompts, lengths, seed=0)
    assert gpu["passes"] == gpu["distinct_shapes"] == 1
    assert abs(gpu["padding"] - (1 - (3 + own) / (3 + 16 * 17))) < 1e-12
    cpu = epoch_shapes(prompts, lengths, seed=0, max_tokens=1024, streams=2)
    # Two streams of 8 consecutive rows of the length-sorted batch: widths 9 and 17.
    assert cpu["passes"] == cpu["distinct_shapes"] == 2
    assert abs(cpu["padding"] - (1 - (6 + own) / (6 + 8 * 9 + 8 * 17))) < 1e-12


def test_a_budget_splits_a_batch_into_passes():
    prompts = [[1, 2, 3] + [10 + k] * 60 for k in range(16)]  # 61 tokens each after the prefix
    lengths = [len(p) + 1 for p in prompts]
    split = epoch_shapes(prompts, lengths, seed=0, max_tokens=500)
    assert split["passes"] == 2 and split["distinct_shapes"] == 1 and split["padding"] == 0


def test_static_shapes_round_passes_up_to_buckets():
    # 160 rows after the prefix [1, 2, 3] of 1-40 tokens of their own, then a one-token answer.
    prompts = [[1, 2, 3] + [10 + k % 7] * (1 + k % 40) for k in range(160)]
    lengths = [len(p) + 1 for p in prompts]
    static = static_shapes(prompts, lengths, [1], seed=5, most=2, multiple=16)
    assert static["prefix"] == 3 and static["passes"] == 10
    assert static["distinct_shapes"] <= 3 and len(static["lengths"]) <= 3  # 2, and the longest possible
    assert all(t % 16 == 0 for t in static["lengths"]) and static["lengths"][-1] <= 3 + 16 * 41
    # More buckets, less padding; every pass fits its bucket.
    more = static_shapes(prompts, lengths, [1], seed=5, most=8, multiple=16)
    assert 0 < more["padding"] < static["padding"] < 1 and more["distinct_shapes"] <= 9


def test_evaluation_shapes_count_the_token_budgets_batches():
    prompts = [[1] * (10 + k % 30) for k in range(300)]  # 300 prompts of 10-39 tokens
    shapes = evaluation_shapes(prompts, budgets=(400, 100_000))
    # One batch holds all 300 rows at the larger budget; at 400 tokens, 10-40 rows per batch.
    assert shapes["100000"] == 1 and 300 // 40 <= shapes["400"] <= 300 // 10 + 1
