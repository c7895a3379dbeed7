"""Auxiliary training tasks (trainer.aux): extra training examples built from the training
dialogues, trained through the same adapter beside the emotion examples, never evaluated as
emotion predictions.

speaker: speaker identification (InstructERC): "which of <the dialogue's speakers> says this
sentence?" (prompt.speaker_question), for trainer.aux_ratio training examples per emotion
example, drawn with the run's seed from the training utterances whose speaker says at least
MIN_UTTERANCES of them and whose dialogue has another such speaker. The answer is read by a
linear head of its own over the final hidden state at the prompt's last token (the state the
emotion head, or the LM head, reads there), over the training split's speakers and masked to the
dialogue's own. Its rows start from the input embeddings of each name's tokens, as
head=classifier's rows start from the labels'. The head trains with the adapter, is saved in
checkpoints with it, and is dropped after training: the saved adapter is the emotion task's only.

A batch's emotion and speaker rows run as separate passes (train.Passes.split), so each pass is
one forward of one kind and the update is still the whole batch's mean loss. Under data
parallel each pass also adds zero times every trained weight (emorec.run.training_passes), so DDP
sees a gradient for the head a pass does not use. FSDP's equal forwards in every process are not
worked out for it: refused (emorec.settings).
"""

import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, replace

import torch

from emorec.data.records import Example
from emorec.errors import EmorecError
from emorec.prompt import PromptFormat, encode_prompts
from emorec.tensors import device_of, on_device, output_head, right_pad

TASKS = ("speaker",)
MIN_UTTERANCES = 5  # a speaker with fewer training utterances is nobody's answer
HEAD = "aux_speaker"  # the head's attribute on the model while it trains


@dataclass(frozen=True)
class SpeakerTask:
    """Speaker identification examples as token ids: `targets[i]` indexes `names`, and
    `candidates[i]` are the indices its prompt offers (the dialogue's speakers)."""

    names: list[str]
    prompts: list[list[int]]
    targets: list[int]
    candidates: list[list[int]]

    def lengths(self) -> list[int]:
        return [len(p) + 1 for p in self.prompts]  # the answer counts as one step, as a head's


def speaker_items(train: list[Example], ratio: float, seed: int):
    """(speaker names, [(utterance, its speaker's index, the dialogue's speakers' indices)])."""
    counts = Counter(ex.speaker for ex in train if ex.speaker)
    names = sorted(n for n, c in counts.items() if c >= MIN_UTTERANCES)
    index = {n: i for i, n in enumerate(names)}
    dialogues = defaultdict(set)
    for ex in train:
        if ex.speaker in index and ex.dialogue_id is not None:
            dialogues[ex.dialogue_id].add(index[ex.speaker])
    eligible = [ex for ex in train if ex.speaker in index and len(dialogues.get(ex.dialogue_id, ())) > 1]
    if not eligible:
        raise EmorecError(
            "trainer.aux=[speaker] needs dialogues with two or more named speakers in the training split; "
            "this dataset has none: drop trainer.aux"
        )
    k = min(len(eligible), round(ratio * len(train)))
    drawn = torch.randperm(len(eligible), generator=torch.Generator().manual_seed(seed))[:k].tolist()
    items = [eligible[i] for i in sorted(drawn)]
    return names, [(ex, index[ex.speaker], sorted(dialogues[ex.dialogue_id])) for ex in items]


def speaker_task(
    tokenizer,
    fmt: PromptFormat,
    question: str,
    train: list[Example],
    ratio: float,
    seed: int,
    max_length: int,
    window: int,
) -> SpeakerTask:
    """The speaker examples' prompts: `question` ({labels}: the dialogue's speakers, {text}) in
    place of the instruction, the utterance shown without its speaker (and without
    demonstrations), its earlier `window` turns as the emotion prompts show them."""
    names, items = speaker_items(train, ratio, seed)
    asked = replace(fmt, template=question, speaker_template=None)
    by_choice = defaultdict(list)  # one call per candidate list: its wording is the label list's
    for i, (_, _, choices) in enumerate(items):
        by_choice[tuple(choices)].append(i)
    prompts: list = [None] * len(items)
    for choices, rows in by_choice.items():
        shown = [replace(items[i][0], speaker=None, demonstrations=()) for i in rows]
        for i, ids in zip(
            rows, encode_prompts(tokenizer, shown, asked, [names[c] for c in choices], max_length, window)
        ):
            prompts[i] = ids
    return SpeakerTask(names, prompts, [t for _, t, _ in items], [c for _, _, c in items])


def attach_head(model, tokenizer, names: list[str]) -> torch.nn.Linear:
    """The speaker head, set on `model` (so the optimizer, checkpoints and the best epoch's
    weights hold it), each row the mean input embedding of its name's tokens (a tokenizer's
    lone word-start token, as SentencePiece's "▁", left out: it would make every row alike)."""
    embeddings = model.get_input_embeddings().weight
    head = torch.nn.Linear(embeddings.shape[1], len(names), bias=False, device=embeddings.device)
    with torch.no_grad():
        for row, name in enumerate(names):
            ids = tokenizer(f" {name}", add_special_tokens=False)["input_ids"]
            ids = [i for i in ids if tokenizer.decode([i]).strip()] or ids
            head.weight[row] = embeddings[ids].float().mean(0)
    setattr(model, HEAD, head)
    return head


def detach_head(model) -> None:
    if hasattr(model, HEAD):
        delattr(model, HEAD)


def final_states(model, prompts: list[list[int]], pad_id: int) -> torch.Tensor:
    """(batch, hidden) final hidden state at each prompt's last token: the input of the model's
    output head there, read by a hook (in this thread only: training streams run passes in
    others)."""
    ids, mask = right_pad(prompts, pad_id, device_of(model))
    taken, me = [], threading.get_ident()

    def take(module, args):
        if threading.get_ident() == me:
            taken.append(args[0])

    handle = output_head(model).register_forward_pre_hook(take)
    try:
        model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    # A prompt-learning adapter's virtual tokens come first: the last positions are the input's.
    hidden = taken[-1][:, -ids.shape[1] :]
    return hidden[torch.arange(len(prompts), device=ids.device), mask.sum(1) - 1]


def speaker_loss(model, head: torch.nn.Linear, task: SpeakerTask, rows: list[int], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy of the speaker `head` over each row's candidates (`model` may be
    wrapped for data parallel; the head is the one attach_head set on it)."""
    states = final_states(model, [task.prompts[j] for j in rows], pad_id)
    logits = head(states.to(head.weight.dtype)).float()
    allowed = torch.zeros_like(logits, dtype=torch.bool)
    for r, j in enumerate(rows):
        allowed[r, task.candidates[j]] = True
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.nn.functional.cross_entropy(logits, on_device([task.targets[j] for j in rows], logits.device))
