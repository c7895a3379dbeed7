"""One task object per kind of model: the single place that answers "what is the loss, what
are the scores, what is a prediction".

A task's `loss(model, prompts, targets)` is the training objective of a batch (targets are
label indices); `predictor(model, prompts)` prepares what a whole evaluation set shares and
returns (tokens of each prompt computed once for all, a function from a batch of prompts to
(predicted label indices, per-example extras)).
"""

import torch

from emorec import reference


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
    one of emorec.fast's answer components, or reference.Reference."""

    def __init__(self, answers, scored, labels, pad_id: int, first_token: bool, impl, tokenizer=None):
        self.answers, self.scored, self.labels, self.pad_id = answers, scored, labels, pad_id
        self.first_token, self.impl, self.tokenizer = first_token, impl, tokenizer
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
        return self.impl.loss(model, prompts, [self.answers[t] for t in targets], self.pad_id)

    def predictor(self, model, prompts: list[list[int]]):
        if self.tokenizer is not None:
            max_new = max(map(len, self.scored)) + 8
            return 0, lambda chunk: reference.generate_labels(model, self.tokenizer, chunk, self.labels, max_new)
        # The prefix every prompt shares runs once for the whole set.
        prefix = self.impl.open(model, prompts)

        def run(chunk: list[list[int]]):
            return ranked(self.impl.scores(model, chunk, self.scored, self.pad_id, self.first_token, prefix))

        return (prefix[0] if prefix else 0), run


class SequenceClassifier:
    """A model with a classification head over the labels (model.task_type=SEQ_CLS): trained with
    cross-entropy on the head, predicting its most probable label. An encoder attends both ways,
    so no part of a prompt is computed independently of what follows it: nothing is shared."""

    streams = True

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def describe(self) -> dict:
        return {"predict": "classify", "scoring": None}

    def lengths(self, prompts: list[list[int]], targets: list[int]) -> list[int]:
        return [len(p) + 1 for p in prompts]  # the label counts as the one-step answer

    def shared_length(self, model, prompts: list[list[int]]) -> int:
        return 0

    def loss(self, model, prompts: list[list[int]], targets: list[int]) -> torch.Tensor:
        return reference.classifier_loss(model, prompts, targets, self.pad_id)

    def predictor(self, model, prompts: list[list[int]]):
        def run(chunk: list[list[int]]):
            return ranked(reference.classifier_scores(model, chunk, self.pad_id))

        return 0, run
