"""The table of experiments/own_data: per dataset, on its metric of record (test, percent), the
bag-of-words baseline (bow/), the defaults a user met before the preset (the paper's label
scoring for one epoch, the head for one epoch, MiniLM at 5e-5 for one epoch: the paper study's
runs for the standard sets, this folder's for the dair-style csv) and `+experiment=own_data`
with the general LLM and with MiniLM.

    python -m experiments.own_data.report > experiments/own_data/table.md
"""

import argparse
import json
from pathlib import Path

from experiments.common import read_results
from experiments.own_data.jobs import DATASETS

HERE = Path(__file__).parent
PAPER = HERE.parent / "paper" / "runs" / "cpu_full"
# column -> (this folder's job, the paper study's job): {d} is the dataset.
COLUMNS = {
    "LLM score, 1 epoch (paper)": ("{d}-score", "{d}-lora_score"),
    "LLM head, 1 epoch": ("{d}-head", "{d}-lora_head"),
    "MiniLM 5e-5, 1 epoch": ("{d}-minilm", "{d}-minilm_lr5e-5"),
    "**preset** LLM": ("{d}-preset", None),
    "preset MiniLM": ("{d}-preset_minilm", None),
}


def pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def test_value(found: dict, name: str | None) -> float | None:
    run = found.get(name) if name else None
    return None if run is None else run["metrics"]["test"][run["metrics"]["metric"]]


def rows(own: dict, paper: dict, bows: dict) -> list[list[str]]:
    lines = []
    for d in DATASETS:
        base = bows.get(d)
        values = {}
        for column, (mine, theirs) in COLUMNS.items():
            value = test_value(own, mine.format(d=d))
            values[column] = value if value is not None else test_value(paper, theirs and theirs.format(d=d))
        preset = values["**preset** LLM"]
        margin = None if preset is None or base is None else preset - base["test"][base["metric"]]
        metric = base["metric"] if base else ""
        train_n = base["train_n"] if base else ""
        lines.append(
            [d, metric, str(train_n), pct(base and base["test"][base["metric"]])]
            + [pct(v) for v in values.values()]
            + ["" if margin is None else f"{100 * margin:+.1f}"]
        )
    return lines


def details(own: dict) -> list[list[str]]:
    """Each preset job's training: steps, epochs, the best one, time, pace."""
    lines = []
    for name, run in own.items():
        if "-preset" not in name or not run["metrics"].get("train"):
            continue
        m, t = run["metrics"], run["metrics"]["train"]
        lines.append(
            [name, str(t["steps"]), str(t["epochs"]), str(m["best_epoch"]), f"{t['seconds']:.0f}"]
            + [f"{t['examples_per_s']:.1f}", pct(m["test"]["accuracy"]), pct(m["test"]["macro_f1"])]
        )
    return lines


def table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=HERE / "runs")
    parser.add_argument("--paper", type=Path, default=PAPER, help="the paper study's results (one-epoch defaults)")
    parser.add_argument("--bow", type=Path, default=HERE / "bow")
    args = parser.parse_args(argv)
    own, paper = read_results(args.runs), read_results(args.paper)
    bows = {p.stem: json.loads(p.read_text()) for p in sorted(args.bow.glob("*.json"))}
    header = ["dataset", "metric", "train n", "TF-IDF + LR", *COLUMNS, "preset − TF-IDF"]
    print(table(header, rows(own, paper, bows)))
    print()
    header = ["preset job", "steps", "epochs", "best epoch", "train s", "examples/s", "test acc", "test macro F1"]
    print(table(header, details(own)))


if __name__ == "__main__":
    main()
