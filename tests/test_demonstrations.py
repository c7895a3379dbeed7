"""Retrieved demonstrations (prompt.demonstrations, emorec.demonstrations): the nearest training
utterances by a sentence encoder's cosine, never the utterance itself or its own dialogue,
always from the training split, cached per split; their place in the prompt, and what goes first
when a prompt is too long; a whole run with them, and what refuses them."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import emorec
from emorec.data.records import Example
from emorec.data.splits import Data
from emorec.demonstrations import embed, nearest, with_demonstrations
from emorec.errors import EmorecError
from emorec.prompt import PromptFormat, encode_prompts
from emorec.run import run

LABELS = ["neutral", "joy", "anger"]
TEMPLATE = "Classify the sentiment of the sentence to {labels}: {text}"


def test_nearest_takes_the_most_similar_least_similar_first():
    keys = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    query = torch.tensor([[1.0, 0.1]])
    assert nearest(query, keys, None, 2) == [[1, 0]]  # 0 is nearest: it comes last
    banned = torch.tensor([[True, False, False, False]])
    assert nearest(query, keys, banned, 2) == [[2, 1]]
    # One per label: the nearest of each, however far.
    labels = torch.tensor([0, 0, 1, 2])
    assert nearest(query, keys, None, 1, labels) == [[3, 2, 0]]
    assert nearest(query, keys, banned, 1, labels) == [[3, 2, 1]]


def example(i: int, text: str, label: int, dialogue: str) -> Example:
    return Example(f"e{i}", text, label, speaker="A", dialogue_id=dialogue)


@pytest.fixture
def data() -> Data:
    train = [
        example(0, "I am so happy today", 1, "d0"),
        example(1, "what a happy day this is", 1, "d0"),
        example(2, "I am furious with you", 2, "d1"),
        example(3, "the meeting is at noon", 0, "d2"),
        example(4, "so happy for you both", 1, "d3"),
    ]
    test = [example(9, "I am so happy", 1, "d0")]  # a test dialogue may share a training one's number
    return Data("toy", "weighted_f1", LABELS, 0, train, [], test, {})


def test_demonstrations_come_from_training_never_the_utterance_or_its_dialogue(data, tiny_encoder):
    shown = with_demonstrations(data, 2, "similar", str(tiny_encoder))
    train = {ex.text: ex for ex in data.train}
    for ex in shown.train:
        assert len(ex.demonstrations) == 2
        for text, label in ex.demonstrations:
            assert text in train and train[text].label == label
            assert train[text].dialogue_id != ex.dialogue_id  # not itself, not its dialogue
    # A test utterance may take from any training dialogue (dialogue numbers restart per split).
    (test,) = shown.test
    assert len(test.demonstrations) == 2 and all(text in train for text, _ in test.demonstrations)
    by_label = with_demonstrations(data, 1, "label", str(tiny_encoder))
    assert sorted(label for _, label in by_label.test[0].demonstrations) == [0, 1, 2]
    # The first training utterance's dialogue holds every other joy but one: "so happy for you both".
    assert [label for _, label in by_label.train[0].demonstrations].count(1) == 1


def test_embeddings_are_cached_per_split(tiny_encoder, monkeypatch):
    texts = ["one text", "another text"]
    first = embed(texts, str(tiny_encoder))
    assert first.shape[0] == 2 and torch.allclose(first.norm(dim=-1), torch.ones(2))

    def no_model(*args, **kwargs):
        raise AssertionError("the encoder ran again")

    monkeypatch.setattr("transformers.AutoModel.from_pretrained", no_model)
    assert torch.equal(embed(texts, str(tiny_encoder)), first)
    with pytest.raises(AssertionError, match="ran again"):
        embed([*texts, "a third"], str(tiny_encoder))  # another split: another checksum


def test_the_prompt_shows_them_and_drops_them_before_the_utterance(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ex = Example("z", "what now?", 0, demonstrations=(("far one", 2), ("near one", 1)))
    fmt = PromptFormat(TEMPLATE)
    (ids,) = encode_prompts(tokenizer, [ex], fmt, LABELS, 512)
    assert tokenizer.decode(ids) == (
        "<|im_start|>user\nClassify the sentiment of the sentence to neutral, joy or anger: \nExamples:\n"
        "far one => anger\nnear one => joy\nNow: what now?<|im_end|>\n<|im_start|>assistant\n"
    )
    (one,) = encode_prompts(
        tokenizer, [Example("z", "what now?", 0, demonstrations=(("near one", 1),))], fmt, LABELS, 512
    )
    assert encode_prompts(tokenizer, [ex], fmt, LABELS, len(ids) - 1) == [one]  # the least similar goes first
    (plain,) = encode_prompts(tokenizer, [Example("z", "what now?", 0)], fmt, LABELS, 512)
    assert encode_prompts(tokenizer, [ex], fmt, LABELS, len(plain)) == [plain]


def test_a_run_with_demonstrations_and_what_refuses_them(make_cfg, tiny_encoder, tmp_path):
    cfg = make_cfg("trainer.epochs=1", "prompt.demonstrations=2", f"prompt.demonstrations_encoder={tiny_encoder}")
    metrics = run(cfg)
    plain_cfg = make_cfg("trainer.epochs=1")
    plain_cfg.output_dir = str(tmp_path / "plain")
    plain = run(plain_cfg)
    # Every prompt grew by its two examples and their labels.
    for split in ("train", "dev", "test"):
        assert metrics["prompt_tokens"][split] > plain["prompt_tokens"][split] + 4, split
    assert metrics["train"]["steps"] == plain["train"]["steps"]
    out = Path(cfg.output_dir)
    assert json.loads((out / "metrics.json").read_text())["prompt_tokens"] == metrics["prompt_tokens"]
    with pytest.raises(EmorecError, match=r"prompt.demonstrations=2\), which labelling new text does not retrieve"):
        emorec.load(out, device="cpu")
    from emorec.export import export

    with pytest.raises(EmorecError, match="prompt.demonstrations shows each text training examples"):
        export(out, tmp_path / "exported")
    with pytest.raises(EmorecError, match="prompt.demonstrations_encoder=/nowhere is not a folder"):
        nowhere = make_cfg("prompt.demonstrations=1", "prompt.demonstrations_encoder=/nowhere")
        nowhere.output_dir = str(tmp_path / "nowhere")
        run(nowhere)
