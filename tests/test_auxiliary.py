"""Auxiliary tasks (trainer.aux, emorec.auxiliary): speaker identification's examples and
prompts, its head and loss, batches whose kinds never share a pass, a whole run with it (what it
trains, what it saves), and what refuses it."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from emorec.auxiliary import HEAD, SpeakerTask, attach_head, final_states, speaker_items, speaker_loss, speaker_task
from emorec.checkpoint import checkpoints, load_checkpoint
from emorec.data.records import Example
from emorec.errors import EmorecError
from emorec.prompt import Context, PromptFormat
from emorec.run import run
from emorec.train import Passes
from tests.launching import ROOT, launch, metrics
from tests.test_distributed import assert_same_run

QUESTION = "Which of {labels} says this sentence: {text}"


def dialogue(d: str, speakers: str, start: int = 0) -> list[Example]:
    return [
        Example(f"{d}-{i}", f"line {start + i} of {d}", i % 2, speaker=s, dialogue_id=d) for i, s in enumerate(speakers)
    ]


def test_examples_come_from_known_speakers_in_dialogues_of_several():
    # A says 6 lines, B 5, C 4 (under MIN_UTTERANCES=5): C is nobody's answer nor a choice.
    train = dialogue("d0", "ABABAB") + dialogue("d1", "ABABC") + dialogue("d2", "AAC") + dialogue("d3", "CC")
    names, items = speaker_items(train, 10.0, seed=0)  # a ratio above 1: every eligible utterance
    assert names == ["A", "B"]
    assert [ex.id for ex, _, _ in items] == [ex.id for ex in train[:10] if ex.speaker != "C"]
    assert all(choices == [0, 1] and names[t] == ex.speaker for ex, t, choices in items)
    # A ratio draws that many per training example, the same ones for the same seed.
    few = speaker_items(train, 0.25, seed=1)[1]
    assert len(few) == round(0.25 * len(train)) and few == speaker_items(train, 0.25, seed=1)[1]
    with pytest.raises(EmorecError, match="needs dialogues with two or more named speakers"):
        speaker_items(dialogue("d0", "AAAAAA"), 1.0, seed=0)


def test_the_question_lists_the_dialogues_speakers_and_hides_the_answer(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    train = dialogue("d0", "ABABAB") + dialogue("d1", "ABABA", start=6)
    fmt = PromptFormat(
        "Classify {labels}: {text}", context=Context(layout="after"), speaker_template="{speaker}: {text}"
    )
    turns = [
        tuple((e.speaker, e.text) for e in train[:i] if e.dialogue_id == ex.dialogue_id) for i, ex in enumerate(train)
    ]
    with_turns = [replace(ex, context=t) for ex, t in zip(train, turns)]
    task = speaker_task(tokenizer, fmt, QUESTION, with_turns, 10.0, 0, 512, 1)
    assert task.names == ["A", "B"] and len(task.prompts) == len(train)
    text = tokenizer.decode(task.prompts[3])
    # The instruction is the question (not the speaker template), the current line has no name,
    # the earlier turn keeps its own.
    assert "Which of A or B says this sentence: \nDialogue:\nA: line 2 of d0\nSentence: line 3 of d0<|im_end|>" in text
    assert task.targets[3] == 1 and task.candidates[3] == [0, 1]


def test_kinds_never_share_a_pass():
    passes = Passes(lambda rows: None, [5] * 10, max_tokens=None, kind=lambda j: j >= 6)
    assert passes.split([0, 7, 1, 8, 2]) == [[0, 1, 2], [7, 8]]
    assert passes.split([7, 9]) == [[7, 9]]
    assert Passes(lambda rows: None, [5] * 4, max_tokens=10).split([0, 1, 2, 3]) == [[0, 1], [2, 3]]


def test_the_head_reads_the_last_prompt_token_and_its_loss_trains(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompts = [[5, 6, 7], [8, 9]]
    states = final_states(model, prompts, tokenizer.pad_token_id)
    # The state the LM head reads: its logits from it are the model's next-token logits.
    logits = model(torch.tensor([[8, 9]])).logits[0, -1]
    assert torch.allclose(model.lm_head(states[1]), logits, atol=1e-5)
    head = attach_head(model, tokenizer, ["A", "B", "C"])
    # This tokenizer writes " B" as a lone space token and "B": the row is "B"'s embedding.
    space, letter = tokenizer(" B", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode([space]) == " "
    assert torch.equal(head.weight[1], model.get_input_embeddings().weight[letter].float())
    assert not torch.equal(head.weight[0], head.weight[1])
    task = SpeakerTask(["A", "B", "C"], prompts, [2, 0], [[0, 2], [0, 1]])
    loss = speaker_loss(model, head, task, [0, 1], tokenizer.pad_token_id)
    # Each row's cross-entropy over its own candidates only.
    scores = head(states)
    expected = (-torch.log_softmax(scores[0, [0, 2]], -1)[1] - torch.log_softmax(scores[1, [0, 1]], -1)[0]) / 2
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert getattr(model, HEAD).weight.grad.abs().sum() > 0


# The classifier with P-Tuning v2 (the study's configuration: the prefix's virtual tokens come first).
@pytest.mark.parametrize("head,adapter", [("lm", "lora"), ("classifier", "ptuning_v2")])
def test_a_run_with_speaker_identification(make_cfg, tmp_path, head, adapter):
    cfg = make_cfg(
        f"head={head}",
        f"adapter={adapter}",
        "trainer.aux=[speaker]",
        "trainer.aux_ratio=0.5",
        "trainer.checkpoint_every=1",
    )
    result = run(cfg)
    plain_cfg = make_cfg(f"head={head}", f"adapter={adapter}")
    plain_cfg.output_dir = str(tmp_path / "plain")
    plain = run(plain_cfg)
    # 16 emotion and 8 speaker examples an epoch, in batches of 4: 6 steps an epoch against 4.
    assert (result["train"]["steps"], plain["train"]["steps"]) == (12, 8)
    assert result["train"]["examples"] == 2 * 24
    assert (
        result["test"]["confusion_matrix"] != plain["test"]["confusion_matrix"]
        or result["train"]["losses"] != plain["train"]["losses"]
    )
    out, plain_out = Path(cfg.output_dir), Path(plain_cfg.output_dir)
    # Checkpoints hold the speaker head (a resumed run continues it); the saved adapter does not.
    weights = load_checkpoint(checkpoints(out)[-1])["weights"]
    assert any(HEAD in name for name in weights)
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert set(saved) == set(load_file(plain_out / "adapter" / "adapter_model.safetensors"))
    assert json.loads((out / "metrics.json").read_text())["test"] == result["test"]
    if head == "classifier":  # resumed from the checkpoint before the last step: the same run
        again = tmp_path / "again"
        shutil.copytree(out, again)
        shutil.rmtree(checkpoints(again)[-1])
        cfg.output_dir, cfg.resume = str(again), True
        resumed = run(cfg)
        assert resumed["train"]["losses"] == result["train"]["losses"] and resumed["test"] == result["test"]


def test_what_refuses_it(make_cfg):
    with pytest.raises(EmorecError, match=r"trainer.aux=\['who'\] is not valid; it must be a list of speaker"):
        run(make_cfg("trainer.aux=[who]"))
    with pytest.raises(EmorecError, match="trainer.aux is not supported under trainer.strategy=fsdp yet"):
        run(make_cfg("trainer.aux=[speaker]", "trainer.strategy=fsdp"))
    with pytest.raises(EmorecError, match="trainer.aux trains a decoder's hidden states"):
        run(make_cfg("trainer.aux=[speaker]", "model=minilm_l6"))
    with pytest.raises(EmorecError, match=r"trainer.aux_ratio=0.0 is not valid; it must be a number > 0"):
        run(make_cfg("trainer.aux=[speaker]", "trainer.aux_ratio=0"))


def test_two_processes_match_one(tiny_model, tmp_path, one_process):
    """Data parallel (two gloo processes under torchrun): the same losses and metrics as one
    process, though each kind of pass leaves the other task's head without a gradient."""
    extra = ("head=classifier", "trainer.aux=[speaker]", "trainer.aux_ratio=0.5")
    run_dir = tmp_path / "run"
    out = launch("torchrun", tiny_model, ROOT, f"hydra.run.dir={run_dir}", *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    single = one_process(*extra)
    assert metrics(run_dir)["train"]["steps"] == metrics(single)["train"]["steps"] == 2 * (16 + 8) // 3
    assert_same_run(run_dir, single)
