"""What a run leaves in its directory besides the adapter: metrics, predictions, a plot."""

import contextlib
import csv
import errno
import json
import os
import shutil
from pathlib import Path

from emorec.errors import EmorecError


@contextlib.contextmanager
def atomic(path: Path):
    """Yields a temporary path next to `path` (a file or a folder) to write; renames it to
    `path` when the block succeeds. On a full disk or any write error the partial output is
    removed, so nothing half-written ever carries the final name."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    old = path.with_name(f"{path.name}.old{os.getpid()}")
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            # A folder cannot be renamed over another: move the old one aside first, so one
            # complete copy carries the name at every moment but the two renames.
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        hint = "free some disk space" if e.errno == errno.ENOSPC else "check the run directory's permissions"
        raise EmorecError(f"cannot write {path} ({e.strerror}); {hint}, then rerun with resume=true") from None
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json(path: Path, data: dict) -> None:
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


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
    with atomic(path) as tmp, open(tmp, "w", newline="") as f:
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
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
