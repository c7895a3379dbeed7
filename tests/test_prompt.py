"""Prompts through the chat template, answers, truncation."""

import pytest
from transformers import AutoTokenizer

from emorec.data import Example
from emorec.errors import EmorecError
from emorec.prompt import encode_answers, encode_prompts, join_labels, render_prompt, scoring_answers

TEMPLATE = "Classify the sentiment of the sentence to {labels}: {text}"
LABELS = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]


@pytest.fixture
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_join_labels():
    assert join_labels(["a"]) == "a"
    assert join_labels(["a", "b", "c"]) == "a, b or c"


def test_paper_prompt_through_chat_template(tokenizer):
    text = render_prompt(tokenizer, TEMPLATE, None, LABELS, "I got the job!")
    assert text == (
        "<|im_start|>user\nClassify the sentiment of the sentence to neutral, joy, surprise, anger, "
        "sadness, disgust or fear: I got the job!<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = render_prompt(tokenizer, TEMPLATE, "", LABELS, "x")
    assert with_system.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")


def test_bad_template_field(tokenizer):
    with pytest.raises(EmorecError, match="unknown field"):
        render_prompt(tokenizer, "{sentence}", None, LABELS, "x")


def test_answers_end_with_end_of_turn(tokenizer):
    answers = encode_answers(tokenizer, TEMPLATE, None, LABELS)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(a[-1] == end for a in answers)
    assert tokenizer.decode(answers[4]) == "sadness<|im_end|>"
    # No label is a prefix of another here, so scoring may drop the shared end token.
    assert scoring_answers(answers) == [a[:-1] for a in answers]
    assert scoring_answers([[5, 2], [5, 6, 2]]) == [[5, 2], [5, 6, 2]]  # "joy" vs "joyful"


def test_no_chat_template(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = None
    assert render_prompt(tok, TEMPLATE, None, ["a", "b"], "hi").endswith(": hi\nAnswer:")
    assert tok.decode(encode_answers(tok, TEMPLATE, None, ["a", "b"])[1]) == " b<|im_end|>"


def test_truncation_keeps_template_whole(tokenizer):
    long = Example(id="x", text=" ".join(["word"] * 200), label=0)
    short = Example(id="y", text="short one", label=0)
    full = encode_prompts(tokenizer, [short], TEMPLATE, None, LABELS, 10_000)[0]
    ids = encode_prompts(tokenizer, [long, short], TEMPLATE, None, LABELS, len(full) + 20)
    assert len(ids[0]) <= len(full) + 20
    assert ids[1] == full
    assert tokenizer.decode(ids[0]).endswith("word<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(EmorecError, match="trainer.max_length"):
        encode_prompts(tokenizer, [long], TEMPLATE, None, LABELS, 10)
