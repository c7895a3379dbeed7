"""The bag-of-words baseline a new corpus should be measured against: TF-IDF features (word
1-2-grams and character 2-5-grams) and a logistic regression, on exactly the splits an emorec
run sees (its dataset config loaded by emorec's own loader, the seeded training sample
included), the regularisation C chosen on dev by the dataset's metric of record, and the test
split scored by emorec's own metrics.

    EMOREC_DATA_DIR=../shared/datasets python -m experiments.own_data.bow dataset=sst5
    python -m experiments.own_data.bow dataset=csv dataset.load.data_files=my.csv --out bow.json

scikit-learn is a dev dependency (`pip install -e ".[dev]"`), not one of emorec's.
"""

import argparse
import json
import time
from pathlib import Path

from scipy.sparse import hstack
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from emorec.data.splits import Data
from emorec.metrics import classification_metrics
from experiments.common import load_data

# Chosen on dev: the regularisation, and whether each class weighs the same (macro F1 rewards it).
GRID = [(c, w) for c in (0.25, 1.0, 4.0, 16.0, 64.0) for w in (None, "balanced")]


def features(train: list[str]):
    """Word and character TF-IDF, fitted on the training texts: characters catch what words
    miss in short informal texts (elongations, emoji, misspellings)."""
    words = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, lowercase=True)
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True, max_features=200_000)
    words.fit(train)
    chars.fit(train)
    return lambda texts: hstack([words.transform(texts), chars.transform(texts)]).tocsr()


def baseline(data: Data, seed: int, grid=GRID) -> dict:
    """Fit on train for each (C, class weight), keep the best on dev by the metric of record,
    score test."""
    start = time.perf_counter()
    encode = features([ex.text for ex in data.train])
    x = {s: encode([ex.text for ex in getattr(data, s)]) for s in ("train", "dev", "test")}
    y = {s: [ex.label for ex in getattr(data, s)] for s in ("train", "dev", "test")}

    def scored(model, split: str) -> dict:
        return classification_metrics(model.predict(x[split]).tolist(), y[split], data.labels, data.neutral)

    best = None
    for c, weight in grid:
        model = LogisticRegression(C=c, class_weight=weight, max_iter=2000, random_state=seed)
        model.fit(x["train"], y["train"])
        dev = scored(model, "dev")
        if best is None or dev[data.metric] > best[1][data.metric]:
            best = ((c, weight), dev, model)
    (c, weight), dev, model = best
    return {
        "dataset": data.name,
        "metric": data.metric,
        "C": c,
        "class_weight": weight,
        "train_n": len(data.train),
        "val": dev,
        "test": scored(model, "test"),
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="emorec overrides that pick the data (dataset=..., dataset.*)")
    parser.add_argument("--out", type=Path, help="write the result here as JSON")
    args = parser.parse_args(argv)
    result = baseline(*load_data(args.overrides))
    result["overrides"] = args.overrides
    m, metric = result["test"], result["metric"]
    print(
        f"{result['dataset']}: TF-IDF + LR (C={result['C']}, class weight {result['class_weight']}): test {metric} "
        f"{m[metric]:.4f}, accuracy {m['accuracy']:.4f}, macro F1 {m['macro_f1']:.4f} ({result['seconds']:.0f} s)"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
