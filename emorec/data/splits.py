"""A run's data: the dataset's loader (its config's `load` node) called, the label settings
checked against the labels it found, and the splits cut to the configured sizes."""

import logging
import random
from collections import Counter
from dataclasses import dataclass

from omegaconf import DictConfig

from emorec.data.records import Example
from emorec.errors import EmorecError, instantiate
from emorec.schema import check_labels

log = logging.getLogger(__name__)


@dataclass
class Data:
    name: str
    metric: str  # the metric of record
    labels: list[str]
    neutral: int | None  # the neutral label's index (micro_f1_no_neutral leaves it out)
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    stats: dict  # what metrics.json says of the data


def load_splits(dataset: DictConfig, seed: int) -> Data:
    """The dataset's splits, cut to the configured sizes (train: a seeded sample)."""
    splits = instantiate(dataset.load)
    labels = splits.labels  # the config's, or inferred from the data (dataset=csv, labels=null)
    check_labels(labels, dataset.neutral_label)
    neutral = labels.index(dataset.neutral_label) if dataset.neutral_label else None
    train = subsample(splits.train, dataset.max_train, seed)
    dev, test = splits.dev[: dataset.max_dev], splits.test[: dataset.max_eval]
    log.info("%s: %d train, %d dev, %d test examples", dataset.name, len(train), len(dev), len(test))
    check_sizes(dataset, labels, splits, dev, test)
    stats = {"labels": labels, "context_window": dataset.context_window, "skipped_rows": splits.skipped}
    stats["left_out"] = splits.left_out
    stats["train_counts"] = {labels[i]: n for i, n in sorted(Counter(ex.label for ex in train).items())}
    return Data(dataset.name, dataset.metric, labels, neutral, train, dev, test, stats)


def check_sizes(dataset: DictConfig, labels: list[str], splits, dev: list, test: list) -> None:
    """Evaluation needs examples in dev and test, before anything trains: a small file's held-out
    dev can come out empty. A label without training examples is said once (the model can still
    score it, but never learns it)."""
    fraction = (dataset.load or {}).get("dev_fraction")
    for name, split, fix in (
        ("dev", dev, f"give a dev file, or raise dataset.load.dev_fraction (now {fraction})" if fraction else ""),
        ("test", test, "give a test file or rows whose split is test"),
    ):
        if not split:
            limit = "max_dev" if name == "dev" else "max_eval"
            fix = fix or "check the data files"
            raise EmorecError(
                f"{dataset.name}: the {name} split has no examples ({len(splits.train)} train); {fix}"
                f"{f', or raise dataset.{limit}' if dataset.get(limit) == 0 else ''}"
            )
    unseen = sorted(set(range(len(labels))) - {ex.label for ex in splits.train})
    if unseen:
        log.warning(
            "%s: label(s) %s have no training examples: the model never learns them; check the labels or the files",
            dataset.name,
            ", ".join(labels[i] for i in unseen),
        )


def subsample(examples: list, n: int | None, seed: int) -> list:
    """A seeded random subset of n examples, in their original order (all when n is None)."""
    if n is None or n >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]
