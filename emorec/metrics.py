"""Classification metrics with torchmetrics: accuracy, macro and weighted F1, unweighted
accuracy (UA, the mean per-class recall), per-class F1 and the confusion matrix; and, for a
label set with a neutral class, micro F1 over the other classes (DailyDialog's convention:
neutral predictions and golds count neither as hits nor as misses of an emotion).

A prediction of -1 (a generation that names no label) counts as wrong: it becomes an extra
"invalid" class that no gold label has, and the averages run over the real classes only.
"""

import torch
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassRecall,
)

METRICS = ("accuracy", "macro_f1", "weighted_f1", "ua", "micro_f1_no_neutral")


def classification_metrics(preds: list[int], golds: list[int], labels: list[str], neutral: int | None = None) -> dict:
    """All metrics; micro_f1_no_neutral only when `neutral` (the neutral label's index) is given."""
    k = len(labels)
    p = torch.tensor(preds, dtype=torch.long)
    g = torch.tensor(golds, dtype=torch.long)
    p = torch.where(p < 0, k, p)  # invalid -> class k
    n = k + 1
    f1 = MulticlassF1Score(num_classes=n, average="none")(p, g)[:k]
    recall = MulticlassRecall(num_classes=n, average="none")(p, g)[:k]
    support = torch.bincount(g, minlength=n)[:k].float()
    confusion = MulticlassConfusionMatrix(num_classes=n)(p, g)
    metrics = {
        "accuracy": MulticlassAccuracy(num_classes=n, average="micro")(p, g).item(),
        # Averages over every class of the label set, as scikit-learn does.
        "macro_f1": f1.mean().item(),
        "weighted_f1": ((f1 * support).sum() / support.sum()).item(),
        "ua": recall.mean().item(),
        "f1_per_class": dict(zip(labels, f1.tolist())),
        "confusion_matrix": confusion[:k, :k].tolist(),
        "invalid": int((p == k).sum()),
        "n": len(golds),
    }
    if neutral is not None:
        emotions = [c for c in range(k) if c != neutral]
        hits = confusion.diagonal()[emotions].sum()
        # Predicted emotions (an invalid prediction is none) plus gold emotions: 2TP / (P + G).
        predicted, gold = confusion[:, emotions].sum(), confusion[emotions, :].sum()
        metrics["micro_f1_no_neutral"] = (2 * hits / (predicted + gold)).item() if predicted + gold else 0.0
    return metrics
