"""Plain transformers against a run's own predictions: `python experiments/export/check.py
OUT PREDICTIONS_CSV` labels the test texts of PREDICTIONS_CSV with `pipeline("text-classification",
model=OUT)` and prints one JSON line: rows, same labels, the largest probability difference,
seconds, and whether emorec was imported (it must not be: this is what a user without emorec
runs). Used by tests/test_export.py and experiments/export/agreement.py."""

import csv
import json
import sys
import time

from transformers import pipeline


def check(folder: str, predictions: str, batch_size: int = 16) -> dict:
    classify = pipeline("text-classification", model=folder, top_k=None, device="cpu")
    with open(predictions, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    start = time.perf_counter()
    out = classify([r["text"] for r in rows], batch_size=batch_size)
    seconds = time.perf_counter() - start
    best = [max(o, key=lambda d: d["score"])["label"] for o in out]
    diff = max(abs(d["score"] - float(r["score_" + d["label"]])) for o, r in zip(out, rows) for d in o)
    same = sum(b == r["prediction"] for b, r in zip(best, rows))
    return {"rows": len(rows), "same": same, "max_prob_diff": diff, "seconds": seconds}


if __name__ == "__main__":
    result = {folder: check(folder, predictions) for folder, predictions in json.loads(sys.argv[1])}
    result["emorec imported"] = "emorec" in sys.modules
    print(json.dumps(result))
