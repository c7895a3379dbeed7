"""What a run leaves in its directory besides the adapter: metrics, predictions, a plot."""

import csv
import json
import os
from pathlib import Path


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)  # never a half-written metrics.json


def prediction_rows(split: str, examples, result: dict, labels: list[str]) -> list[list]:
    rows = []
    for ex, pred, extra in zip(examples, result["preds"], result["extra"]):
        scores = extra if isinstance(extra, list) else [None] * len(labels)
        text_out = extra if isinstance(extra, str) else None
        rows.append(
            [split, ex.id, ex.text, labels[ex.label], labels[pred] if pred >= 0 else "INVALID", text_out]
            + [None if s is None else round(s, 6) for s in scores]
        )
    return rows


def prediction_columns(labels: list[str]) -> list[str]:
    return ["split", "id", "text", "gold", "prediction", "generated"] + [f"score_{lab}" for lab in labels]


def write_predictions(path: Path, columns: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)


def plot_confusion(path: Path, matrix: list[list[int]], labels: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(labels), 0.8 + 0.7 * len(labels)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    top = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, v, ha="center", va="center", color="white" if v > top / 2 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
