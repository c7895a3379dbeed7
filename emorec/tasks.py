"""One task object per kind of model: the single place that answers "what is the loss, what
are the scores, what is a prediction".

A task's `loss(model, prompts, targets)` is the training objective of a batch (targets are
label indices); `predictor(model, prompts)` prepares what a whole evaluation set shares and
returns (tokens of each prompt computed once for all, a function from a batch of prompts to
(predicted label indices, per-example extras)).
"""

import copy
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from emorec import reference
from emorec.tensors import device_of, on_device


class Task(Protocol):
    """What a run trains and evaluates: LabelWords, LabelHead or SequenceClassifier."""

    streams: bool  # whether evaluation batches may run in several threads at once
    smoothing: float  # the loss's label smoothing (trainer.label_smoothing; reference.target_logp)

    def describe(self) -> dict: ...

    def lengths(self, prompts: list[list[int]], targets: list[int]) -> list[int]:
        """Each training example's tokens, its answer's included."""

    def shared_length(self, model, prompts: list[list[int]]) -> int:
        """The tokens a pass of these prompts runs once for all of them."""

    def loss(self, model, prompts: list[list[int]], targets: list[int]) -> torch.Tensor: ...

    def predictor(self, model, prompts: list[list[int]]) -> tuple[int, Callable]:
        """(tokens every prompt shares, run(batch of prompts) -> (label indices, extras))."""


@dataclass(frozen=True)
class Balance:
    """Class-balanced training and prediction, for rare classes that a model otherwise never
    predicts. `weights[label]`: each training example's loss is weighted by its label's (1 /
    share of the training set) ** trainer.balance, the weights averaging 1 over the training
    set. `adjust[label]`: trainer.logit_adjust * log(share), subtracted from every label score
    before the argmax (post-hoc logit adjustment, Menon et al. 2021). None: off."""

    weights: tuple[float, ...] | None = None
    adjust: tuple[float, ...] | None = None

    @classmethod
    def of(cls, targets: list[int], labels: int, power: float, tau: float) -> "Balance":
        counts = Counter(targets)
        # A label absent from training counts once: finite weights and adjustments.
        share = [max(counts[i], 1) / max(len(targets), 1) for i in range(labels)]
        weights = None
        if power and targets:
            raw = [s**-power for s in share]
            mean = sum(raw[t] for t in targets) / len(targets)
            weights = tuple(w / mean for w in raw)
        adjust = tuple(tau * math.log(s) for s in share) if tau else None
        return cls(weights, adjust)

    def of_targets(self, targets: list[int], device) -> torch.Tensor | None:
        """The weights of examples with these labels (None: unweighted)."""
        if self.weights is None:
            return None
        return on_device([self.weights[t] for t in targets], device, torch.float32)

    def adjusted(self, scores: torch.Tensor) -> torch.Tensor:
        return scores if self.adjust is None else scores - scores.new_tensor(self.adjust)


def ranked(scores: torch.Tensor) -> tuple[list[int], list[list[float]]]:
    """(the best label of each row, the label-set probabilities) from (batch, labels) scores."""
    probs = torch.softmax(scores, -1).tolist()  # one read from the device per batch
    return [max(range(len(row)), key=row.__getitem__) for row in probs], probs


class LabelWords:
    """A causal LM that answers with label words. Training: the answer's negative
    log-likelihood (`answers[label]`, ending with the end-of-turn token). Prediction: the label
    whose answer (`scored[label]`, see prompt.scoring_answers) is most likely after the prompt,
    or its first token only (`first_token`); or, with `tokenizer`, greedy generation parsed into a
    label (-1 when it names none), as the paper evaluated. `impl` computes the loss and scores:
    one of emorec.fast's answer components, or reference.Reference. `balance`: see Balance."""

    smoothing = 0.0

    def __init__(
        self, answers, scored, labels, pad_id: int, first_token: bool, impl, tokenizer=None, balance=Balance()
    ):
        self.answers, self.scored, self.labels, self.pad_id = answers, scored, labels, pad_id
        self.first_token, self.impl, self.tokenizer, self.balance = first_token, impl, tokenizer, balance
        self.streams = tokenizer is None  # generation keeps one stream

    def describe(self) -> dict:
        if self.tokenizer is not None:
            return {"predict": "generate", "scoring": None}
        return {"predict": "score", "scoring": "first_token" if self.first_token else "answer"}

    def lengths(self, prompts: list[list[int]], targets: list[int]) -> list[int]:
        return [len(p) + len(self.answers[t]) for p, t in zip(prompts, targets)]

    def shared_length(self, model, prompts: list[list[int]]) -> int:
        return self.impl.shared_length(model, prompts)

    def loss(self, model, prompts: list[list[int]], targets: list[int]) -> torch.Tensor:
        # The static step takes its values on the host, to copy them to the device in one go.
        device = "cpu" if getattr(self.impl, "host_inputs", False) else device_of(model)
        weights = self.balance.of_targets(targets, device)
        answers = [self.answers[t] for t in targets]
        return self.impl.loss(model, prompts, answers, self.pad_id, weights, self.smoothing)

    def with_impl(self, impl) -> "LabelWords":
        """This task, its loss and scores computed by `impl`."""
        task = copy.copy(self)
        task.impl = impl
        return task

    def predictor(self, model, prompts: list[list[int]]):
        if self.tokenizer is not None:
            max_new = max(map(len, self.scored)) + 8
            return 0, lambda chunk: reference.generate_labels(model, self.tokenizer, chunk, self.labels, max_new)
        # The prefix every prompt shares runs once for the whole set.
        prefix = self.impl.open(model, prompts)

        def run(chunk: list[list[int]]):
            scores = self.impl.scores(model, chunk, self.scored, self.pad_id, self.first_token, prefix)
            return ranked(self.balance.adjusted(scores))

        return (prefix[0] if prefix else 0), run


class LabelHead(LabelWords):
    """A decoder with a classification head over the labels (head=classifier, emorec.classifier): the
    head's logits at the prompt's last token are what a causal LM's next-token logits are there,
    over the labels instead of the vocabulary. So it is label scoring with one-token answers,
    label i's "token" being i: trained with cross-entropy, predicting the argmax, through the
    same engine components (shared prefix, packed pass). In training the label's index follows
    the prompt as an answer's last token does, an input whose output nothing reads."""

    def __init__(self, labels: list[str], pad_id: int, impl, balance=Balance()):
        answers = [[i] for i in range(len(labels))]
        super().__init__(answers, answers, labels, pad_id, True, impl, balance=balance)

    def describe(self) -> dict:
        return {"predict": "classify", "scoring": None}


class SequenceClassifier:
    """An encoder with a classification head over the labels (model=minilm_l6, head=classifier):
    trained with cross-entropy on the head, predicting its most probable label. An encoder
    attends both ways, so no part of a prompt is computed independently of what follows it:
    nothing is shared."""

    streams, smoothing = True, 0.0

    def __init__(self, pad_id: int, balance=Balance()):
        self.pad_id, self.balance = pad_id, balance

    def describe(self) -> dict:
        return {"predict": "classify", "scoring": None}

    def lengths(self, prompts: list[list[int]], targets: list[int]) -> list[int]:
        return [len(p) + 1 for p in prompts]  # the label counts as the one-step answer

    def shared_length(self, model, prompts: list[list[int]]) -> int:
        return 0

    def loss(self, model, prompts: list[list[int]], targets: list[int]) -> torch.Tensor:
        weights = self.balance.of_targets(targets, device_of(model))
        return reference.classifier_loss(model, prompts, targets, self.pad_id, weights, self.smoothing)

    def predictor(self, model, prompts: list[list[int]]):
        def run(chunk: list[list[int]]):
            return ranked(self.balance.adjusted(reference.classifier_scores(model, chunk, self.pad_id)))

        return 0, run
