"""Prompts through the chat template, answers, truncation."""

import pytest
from transformers import AutoTokenizer

from emorec.data.records import Example
from emorec.errors import EmorecError
from emorec.fast.prefix import common_prefix
from emorec.prompt import (
    Context,
    PromptFormat,
    encode_answers,
    encode_prompts,
    join_labels,
    render_prompt,
    scoring_answers,
)

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
    full = encode_prompts(tokenizer, [short], PromptFormat(TEMPLATE), LABELS, 10_000)[0]
    ids = encode_prompts(tokenizer, [long, short], PromptFormat(TEMPLATE), LABELS, len(full) + 20)
    assert len(ids[0]) <= len(full) + 20
    assert ids[1] == full
    assert tokenizer.decode(ids[0]).endswith("word<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(EmorecError, match="x: the prompt without its utterance is longer than trainer.max_length=10"):
        encode_prompts(tokenizer, [long], PromptFormat(TEMPLATE), LABELS, 10)


def test_a_word_longer_than_max_length_is_cut_too(tokenizer, caplog):
    """10,000 characters without a space: cut by characters, counted once in the log."""
    word = Example(id="w", text="ab" * 5000, label=0)
    short = Example(id="y", text="short one", label=0)
    full = encode_prompts(tokenizer, [short], PromptFormat(TEMPLATE), LABELS, 10_000)[0]
    with caplog.at_level("INFO"):
        ids = encode_prompts(tokenizer, [word, word, short], PromptFormat(TEMPLATE), LABELS, len(full) + 20)
    assert len(ids[0]) <= len(full) + 20 and len(ids[0]) >= len(full) and ids[2] == full
    assert "2 utterance(s) lost their end to fit trainer.max_length" in caplog.text


CONTEXT = Context(before="Conversation so far:\n{context}\n\n", layout="before")
AFTER = Context(layout="after")
TURNS = (("Ann", "first thing said"), (None, "second thing said"), ("Cal", "third thing said"))


def _with_context(text="what now?", context=TURNS):
    return Example(id="z", text=text, label=0, speaker="Bob", dialogue_id="d", context=context)


def test_context_window_zero_is_the_paper_prompt(tokenizer):
    ex = _with_context()
    plain = encode_prompts(tokenizer, [Example(id="z", text="what now?", label=0)], PromptFormat(TEMPLATE), LABELS, 256)
    assert encode_prompts(tokenizer, [ex], PromptFormat(TEMPLATE, context=CONTEXT), LABELS, 256, 0) == plain


def test_context_window_puts_the_last_k_turns_first(tokenizer):
    ids = encode_prompts(tokenizer, [_with_context()], PromptFormat(TEMPLATE, context=CONTEXT), LABELS, 256, 2)
    assert tokenizer.decode(ids[0]) == (
        "<|im_start|>user\nConversation so far:\nsecond thing said\nCal: third thing said\n\n"
        "Classify the sentiment of the sentence to neutral, joy, surprise, anger, sadness, disgust or fear: "
        "what now?<|im_end|>\n<|im_start|>assistant\n"
    )
    # A window wider than the dialogue so far takes all of it; the first utterance has none.
    wide = tokenizer.decode(
        encode_prompts(tokenizer, [_with_context()], PromptFormat(TEMPLATE, context=CONTEXT), LABELS, 256, 9)[0]
    )
    assert "Ann: first thing said\nsecond thing said\nCal: third thing said\n\n" in wide
    first = encode_prompts(
        tokenizer, [_with_context(context=())], PromptFormat(TEMPLATE, context=CONTEXT), LABELS, 256, 3
    )
    assert "Conversation" not in tokenizer.decode(first[0])


def test_context_truncation_drops_oldest_turns_and_keeps_the_utterance_whole(tokenizer):
    ex = _with_context(text="the utterance to classify stays whole")
    full = encode_prompts(tokenizer, [ex], PromptFormat(TEMPLATE, context=CONTEXT), LABELS, 10_000, 3)[0]
    two = encode_prompts(
        tokenizer, [_with_context(ex.text, TURNS[1:])], PromptFormat(TEMPLATE, context=CONTEXT), LABELS, 10_000, 3
    )
    # One token short of the full prompt: the oldest turn goes, the rest is exactly the 2-turn prompt.
    cut = encode_prompts(tokenizer, [ex], PromptFormat(TEMPLATE, context=CONTEXT), LABELS, len(full) - 1, 3)[0]
    assert cut == two[0]
    # Shorter than any context allows: no context, and the utterance itself still whole.
    bare = encode_prompts(tokenizer, [ex], PromptFormat(TEMPLATE, context=CONTEXT), LABELS, 10_000, 0)[0]
    assert encode_prompts(tokenizer, [ex], PromptFormat(TEMPLATE, context=CONTEXT), LABELS, len(bare), 3)[0] == bare
    # Only below that does the utterance lose words.
    shorter = encode_prompts(tokenizer, [ex], PromptFormat(TEMPLATE, context=CONTEXT), LABELS, len(bare) - 2, 3)[0]
    assert len(shorter) <= len(bare) - 2 and "stays whole" not in tokenizer.decode(shorter)


def test_context_after_the_instruction_keeps_the_shared_prefix(tokenizer):
    """Layout after: the instruction and label list first, then the turns with their speakers,
    then the utterance to classify, marked: the prompts of a batch share everything up to the
    label list, where the layout before shares only the chat header."""
    ids = encode_prompts(tokenizer, [_with_context()], PromptFormat(TEMPLATE, context=AFTER), LABELS, 256, 2)
    assert tokenizer.decode(ids[0]) == (
        "<|im_start|>user\nClassify the sentiment of the sentence to neutral, joy, surprise, anger, sadness, "
        "disgust or fear: \nDialogue:\nsecond thing said\nCal: third thing said\nSentence: Bob: what now?"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    batch = [_with_context(), _with_context("something else", (("Dee", "other words"),)), _with_context(context=())]
    plain = encode_prompts(tokenizer, batch, PromptFormat(TEMPLATE), LABELS, 256)
    after = encode_prompts(tokenizer, batch, PromptFormat(TEMPLATE, context=AFTER), LABELS, 256, 3)
    before = encode_prompts(tokenizer, batch, PromptFormat(TEMPLATE, context=CONTEXT), LABELS, 256, 3)
    instruction = tokenizer(
        "<|im_start|>user\nClassify the sentiment of the sentence to neutral, joy, surprise, anger, sadness, "
        "disgust or fear:",
        add_special_tokens=False,
    )["input_ids"]
    assert common_prefix(after) >= len(instruction) and after[0][: len(instruction)] == instruction
    assert common_prefix(after) >= common_prefix(plain) - 1  # at most the space before the utterance
    assert common_prefix(before) < len(instruction) // 2


def test_context_after_truncates_the_oldest_turns_first(tokenizer):
    ex = _with_context(text="the utterance to classify stays whole")
    full = encode_prompts(tokenizer, [ex], PromptFormat(TEMPLATE, context=AFTER), LABELS, 10_000, 3)[0]
    two = encode_prompts(
        tokenizer, [_with_context(ex.text, TURNS[1:])], PromptFormat(TEMPLATE, context=AFTER), LABELS, 10_000, 3
    )[0]
    assert encode_prompts(tokenizer, [ex], PromptFormat(TEMPLATE, context=AFTER), LABELS, len(full) - 1, 3)[0] == two
    none = encode_prompts(
        tokenizer, [_with_context(ex.text, ())], PromptFormat(TEMPLATE, context=AFTER), LABELS, 10_000, 3
    )[0]
    assert encode_prompts(tokenizer, [ex], PromptFormat(TEMPLATE, context=AFTER), LABELS, len(none), 3)[0] == none
    assert "Sentence: Bob: the utterance to classify stays whole" in tokenizer.decode(none)


SPEAKING = "Classify the emotion {speaker} feels when saying the sentence to {labels}: {text}"


def test_a_speaker_aware_prompt_names_the_speaker_and_leaves_the_rest_alone(tokenizer):
    fmt = PromptFormat(TEMPLATE, speaker_template=SPEAKING)
    named = Example("a", "I got the job!", 1, speaker="Ross")
    unnamed = Example("b", "I got the job!", 1)  # a dataset without speakers (SST, MOSI)
    ids = encode_prompts(tokenizer, [named, unnamed], fmt, LABELS, 256)
    assert tokenizer.decode(ids[0]) == (
        "<|im_start|>user\nClassify the emotion Ross feels when saying the sentence to neutral, joy, surprise, "
        "anger, sadness, disgust or fear: I got the job!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids[1] == encode_prompts(tokenizer, [unnamed], PromptFormat(TEMPLATE), LABELS, 256)[0]
    # With context, the turns keep their speakers' names, the same names as the instruction's.
    ex = _with_context()
    with_context = encode_prompts(
        tokenizer, [ex], PromptFormat(TEMPLATE, context=AFTER, speaker_template=SPEAKING), LABELS, 256, 2
    )
    text = tokenizer.decode(with_context[0])
    assert f"emotion {ex.speaker} feels" in text and f"Sentence: {ex.speaker}: {ex.text}" in text
    # A name with braces is text, not a field.
    odd = Example("c", "hm", 0, speaker="{labels}")
    assert "emotion {labels} feels" in tokenizer.decode(encode_prompts(tokenizer, [odd], fmt, LABELS, 256)[0])


def test_a_speaker_template_without_its_fields_is_refused(make_cfg):
    from emorec.settings import check_config

    with pytest.raises(EmorecError, match=r"prompt.speaker_template has no \{text\} field"):
        check_config(make_cfg("prompt.speaker_template='{speaker} says so to {labels}'"))
    with pytest.raises(EmorecError, match=r"prompt.speaker_template has an unknown field .*use only \{labels\}"):
        check_config(make_cfg("prompt.speaker_template='{who} said: {text}'"))
