"""The erc study's tables from its committed results (runs/<job>/metrics.json): each job's test
weighted F1 (MELD's and EmoryNLP's metric of record), macro F1, dev weighted F1, the weakest
classes' F1, the best epoch, training and test-evaluation time and prompt length; then each
job run with other seeds too (jobs named <job>-seed<N>), as mean ± standard deviation over
its seeds.

    python -m experiments.erc.report               # runs/
    python -m experiments.erc.report experiments/erc/xeon   # another folder of such runs
    python -m experiments.erc.report --outputs outputs/erc   # + logit adjustment's tau chosen on dev

With --outputs, each job whose predictions.csv is still in <outputs>/<job>/ (they are not committed:
they hold the datasets' text) also gets logit adjustment's tau chosen on its dev predictions by the
metric of record (experiments.classifiers.report.TAUS) and test weighted F1 under it, against the
job's own tau: does choosing tau per run pay?
"""

import argparse
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from experiments.classifiers.report import adjusted, prior_of
from experiments.common import read_results

HERE = Path(__file__).parent
COLUMNS = (
    "| job | test weighted F1 | test macro F1 | dev weighted F1 | disgust F1 | fear F1 | best epoch "
    "| training s | test eval s | prompt tokens |"
)
RETUNED = "| job | its tau | tau chosen on dev | test weighted F1 at it | change | dev weighted F1 at it |"
SEEDS = "| configuration | seeds | test weighted F1 | test macro F1 | dev weighted F1 | training s |"


def row(name: str, metrics: dict) -> str:
    test, per_class = metrics["test"], metrics["test"]["f1_per_class"]
    weak = [f"{100 * per_class[c]:.1f}" if c in per_class else "-" for c in ("disgust", "fear")]
    tokens = metrics.get("prompt_tokens", {}).get("train")
    cells = [
        f"{100 * test['weighted_f1']:.1f}",
        f"{100 * test['macro_f1']:.1f}",
        f"{100 * metrics['val']['weighted_f1']:.1f}",
        *weak,
        str(metrics.get("best_epoch", "-")),
        f"{metrics['train']['seconds']:.0f}",
        eval_seconds(metrics),
        f"{tokens:.1f}" if tokens else "-",
    ]
    return f"| {name} | " + " | ".join(cells) + " |"


def eval_seconds(metrics: dict) -> str:
    """The test set's prediction time: its examples over their rate."""
    rate, matrix = metrics.get("test_examples_per_s"), metrics["test"].get("confusion_matrix")
    return f"{sum(map(sum, matrix)) / rate:.0f}" if rate and matrix else "-"


def spread(runs: list[dict], get) -> str:
    """Mean ± standard deviation of get(metrics), in percent, over runs."""
    values = [100 * get(m) for m in runs]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def seed_rows(found: dict) -> list[str]:
    """One row per configuration with seed jobs: mean ± standard deviation over them."""
    groups = defaultdict(list)
    for name, job in found.items():
        if match := re.fullmatch(r"(.+)-seed\d+", name):
            groups[match[1]].append(job["metrics"])
    for name in groups:
        if name in found:  # the job itself, with its own seed
            groups[name].insert(0, found[name]["metrics"])
    rows = []
    for name, runs in groups.items():
        cells = [
            str(len(runs)),
            spread(runs, lambda m: m["test"]["weighted_f1"]),
            spread(runs, lambda m: m["test"]["macro_f1"]),
            spread(runs, lambda m: m["val"]["weighted_f1"]),
            f"{statistics.mean(m['train']['seconds'] for m in runs):.0f}",
        ]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def retuned_rows(found: dict, outputs: Path) -> list[str]:
    """Per job with predictions in outputs/<job>/: the dev-best tau of logit adjustment, test under it."""
    rows = []
    for name, job in found.items():
        metrics, applied = job["metrics"], job["config"]["trainer"].get("logit_adjust", 0.0)
        labels = metrics["data"]["labels"]
        prior = prior_of(labels, metrics["data"].get("train_counts"))
        result = prior and adjusted(outputs / name / "predictions.csv", labels, prior, applied, by="weighted_f1")
        if not result:  # no predictions at hand, or a run from before metrics.json kept the prior
            continue
        test, own = result["test"]["weighted_f1"], metrics["test"]["weighted_f1"]
        cells = [f"{applied:g}", f"{result['tau']:g}", f"{100 * test:.1f}", f"{100 * (test - own):+.1f}"]
        rows.append(f"| {name} | " + " | ".join([*cells, f"{100 * result['dev']['weighted_f1']:.1f}"]) + " |")
    return rows


def header(columns: str) -> list[str]:
    """A markdown table's header row and its separator."""
    return [columns, "|" + "---|" * columns.count(" | ") + "---|"]


def table(results: Path = HERE / "runs", found: dict | None = None) -> str:
    """The job table and the seed table of the runs in `results` (or `found`, read from them already)."""
    found = read_results(results) if found is None else found
    lines = header(COLUMNS)
    lines += [row(name, job["metrics"]) for name, job in found.items()]
    if seeds := seed_rows(found):
        lines += ["", *header(SEEDS), *seeds]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="?", type=Path, default=HERE / "runs", help="a folder of <job>/metrics.json")
    parser.add_argument("--outputs", type=Path, help="the jobs' run directories, for tau chosen on dev")
    args = parser.parse_args(argv)
    if not any(args.runs.glob("*/metrics.json")):
        sys.exit(f"report: no <job>/metrics.json in {args.runs}; pass a folder of runs such as experiments/erc/xeon")
    found = read_results(args.runs)
    print(table(found=found), end="")
    if args.outputs and (rows := retuned_rows(found, args.outputs)):
        print("", *header(RETUNED), *rows, sep="\n")


if __name__ == "__main__":
    main()
