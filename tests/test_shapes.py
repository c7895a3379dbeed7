"""experiments/shapes (issue 38's baseline): the pass shapes and padding of an epoch, counted
from the engine's own batching and prefix rule, checked on prompts whose answer is known."""

from experiments.shapes.shapes import epoch_shapes


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
