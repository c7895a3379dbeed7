"""A corpus in the format of a public emotion release (dair-ai/emotion: a `text,label` csv, the
label an integer id, one row per sentence), made here from a corpus nobody prepared for it:
DailyDialog's non-neutral utterances, taken out of their dialogues, at most `--per-class` of
each emotion (seeded), all splits pooled into one file with no split column. A run loads it
with the README's own-data options alone (ids mapped to names, test and dev held out):

    python -m experiments.own_data.dair --out outputs/own_data/dair/emotion.csv
    python -m emorec +experiment=own_data dataset=csv dataset.load.data_files=outputs/own_data/dair/emotion.csv \
        dataset.labels="[sadness,joy,anger,fear,surprise,disgust]" dataset.load.test_fraction=0.2

The file holds DailyDialog's text: it is written under outputs/ and never committed.
"""

import argparse
import csv
import random
from pathlib import Path

from experiments.common import load_data

# The ids: dair-ai/emotion's label order without its love (DailyDialog has none), with
# DailyDialog's disgust (which dair lacks) last.
LABELS = ["sadness", "joy", "anger", "fear", "surprise", "disgust"]
# DailyDialog's emotion -> the label here (its happiness is dair's joy).
FROM = {
    "sadness": "sadness",
    "happiness": "joy",
    "anger": "anger",
    "fear": "fear",
    "surprise": "surprise",
    "disgust": "disgust",
}


def rows(per_class: int, seed: int) -> list[tuple[str, int]]:
    """(text, id) for at most per_class utterances of each emotion, in a seeded random order."""
    data, _ = load_data(["dataset=dailydialog"])
    by_label: dict[str, list[str]] = {name: [] for name in LABELS}
    seen = set()
    for ex in data.train + data.dev + data.test:
        word = FROM.get(data.labels[ex.label])
        if word is not None and ex.text not in seen:  # DailyDialog repeats some dialogues
            seen.add(ex.text)
            by_label[word].append(ex.text)
    rng = random.Random(seed)
    picked = [
        (text, LABELS.index(w))
        for w, texts in by_label.items()
        for text in rng.sample(texts, min(per_class, len(texts)))
    ]
    rng.shuffle(picked)
    return picked


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/own_data/dair/emotion.csv"))
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    picked = rows(args.per_class, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(picked)
    counts = {name: sum(1 for _, i in picked if i == k) for k, name in enumerate(LABELS)}
    print(f"{args.out}: {len(picked)} rows, {counts}")


if __name__ == "__main__":
    main()
