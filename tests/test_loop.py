"""The fast paths (left padding, logits only at answer positions, cached label scoring) against
plain one-sequence-at-a-time computations on the tiny model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from emorec.loop import answer_loss, parse_label, score_labels, train_batches

TOL = 1e-4  # fp32; padding and batching only reorder floating-point sums


@pytest.fixture
def model(tiny_model):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


def seq_logprob(model, prompt, answer):
    """log P(answer | prompt) from one unpadded full forward pass."""
    ids = torch.tensor([prompt + answer])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(answer))


PROMPTS = [[5, 9, 30, 41, 7], [12, 13], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
ANSWERS = [[20, 2], [21, 22, 2], [23, 24, 25, 2], [26]]


def test_score_labels_matches_plain_forward(model):
    scores = score_labels(model, PROMPTS, ANSWERS, pad_id=2)
    for i, p in enumerate(PROMPTS):
        for j, a in enumerate(ANSWERS):
            assert scores[i, j].item() == pytest.approx(seq_logprob(model, p, a), abs=TOL)


def test_answer_loss_matches_plain_forward(model):
    answers = [ANSWERS[0], ANSWERS[2], ANSWERS[3]]
    loss = answer_loss(model, PROMPTS, answers, pad_id=2)
    expected = -sum(seq_logprob(model, p, a) for p, a in zip(PROMPTS, answers)) / len(PROMPTS)
    assert loss.item() == pytest.approx(expected, abs=TOL)


def test_parse_label():
    labels = ["neutral", "joy", "sadness"]
    assert parse_label("Sadness", labels) == 2
    assert parse_label("The answer is joy, not neutral.", labels) == 1
    assert parse_label("joyful", labels) == -1
    assert parse_label("", labels) == -1


def test_train_batches_cover_every_example_once():
    lengths = [(i * 37) % 50 for i in range(103)]
    batches = train_batches(lengths, 8, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(103))
    again = train_batches(lengths, 8, torch.Generator().manual_seed(0))
    assert batches == again


SHARED = [[5, 9, 30, 41, 7, 8], [5, 9, 30, 12, 13], [5, 9, 30, 41, 3, 4, 6, 10, 11]]


def test_shared_prefix_is_found_and_exact(model):
    from emorec.loop import common_prefix

    assert common_prefix(SHARED) == 3 and common_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # keeps a last token
    assert common_prefix(PROMPTS) == 0
    answers = [ANSWERS[0], ANSWERS[1], ANSWERS[2]]
    shared = answer_loss(model, SHARED, answers, pad_id=2)
    assert shared.item() == pytest.approx(
        answer_loss(model, SHARED, answers, pad_id=2, share_prefix=False).item(), abs=TOL
    )
    expected = -sum(seq_logprob(model, p, a) for p, a in zip(SHARED, answers)) / len(SHARED)
    assert shared.item() == pytest.approx(expected, abs=TOL)
    scores = score_labels(model, SHARED, ANSWERS, pad_id=2)
    for i, p in enumerate(SHARED):
        for j, a in enumerate(ANSWERS):
            assert scores[i, j].item() == pytest.approx(seq_logprob(model, p, a), abs=TOL)


def test_shared_prefix_gradients_equal_the_unshared_ones(model):
    model.train()
    grads = []
    for share in (True, False):
        model.zero_grad()
        answer_loss(model, SHARED, ANSWERS[:3], pad_id=2, share_prefix=share).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
