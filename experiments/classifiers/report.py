"""The table of experiments/classifiers/runs (jobs.py): per job its head, adapter and
initialisation, dialogue context, class balance, test and dev metrics, training and job time.
Post-hoc logit adjustment needs no training: with the jobs' predictions.csv at hand (--outputs),
it is swept on each job's dev predictions and the dev-best tau applied to test.

    python -m experiments.classifiers.report [--outputs outputs/classifiers] > experiments/classifiers/table.md
"""

import argparse
import csv
import json
import math
from pathlib import Path

from omegaconf import OmegaConf

from emorec.metrics import classification_metrics

HERE = Path(__file__).parent
TAUS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]


def pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def describe(config: dict) -> dict:
    adapter = config["adapter"]
    head = config["head"]["name"]
    return {
        "dataset": config["dataset"]["name"],
        "head": head if head == "lm" else f"head ({config['head']['init']})",
        "adapter": adapter["name"] + (f" ({adapter['init']})" if adapter.get("init") else ""),
        "context": config["dataset"]["context_window"],
        "layout": config["prompt"].get("context_layout", "before") if config["dataset"]["context_window"] else "",
        "balance": config["trainer"].get("balance", 0.0),
        "adjust": config["trainer"].get("logit_adjust", 0.0),
    }


def prior_of(labels: list[str], counts: dict[str, int] | None) -> list[float] | None:
    """The training prior from the training split's label counts as the run saw them (a label never
    seen counts once, as emorec's own adjustment does); None when the run did not keep them."""
    total = sum((counts or {}).values())
    return [max(counts.get(label, 0), 1) / total for label in labels] if total else None


def adjusted(
    path: Path, labels: list[str], prior: list[float], applied: float = 0.0, by: str = "macro_f1"
) -> dict | None:
    """Post-hoc logit adjustment from a job's predictions: the tau of TAUS best on dev by `by`, dev
    and test metrics under it. `applied`: the tau the job's saved probabilities already carry (its
    trainer.logit_adjust), added back first: log p + applied * log prior is the unadjusted score."""
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    log_prior = [math.log(p) for p in prior]
    # Each split's unadjusted scores and golds, read once for every tau.
    splits = {
        split: (
            [
                [
                    math.log(max(float(r[f"score_{label}"]), 1e-30)) + applied * lp
                    for label, lp in zip(labels, log_prior)
                ]
                for r in rows
                if r["split"] == split
            ],
            [labels.index(r["gold"]) for r in rows if r["split"] == split],
        )
        for split in ("dev", "test")
    }

    def metrics(split: str, tau: float) -> dict:
        scores, golds = splits[split]
        preds = [max(range(len(labels)), key=lambda i: row[i] - tau * log_prior[i]) for row in scores]
        return classification_metrics(preds, golds, labels, 0)

    dev = {tau: metrics("dev", tau) for tau in TAUS}
    best = max(TAUS, key=lambda tau: dev[tau][by])
    return {"tau": best, "dev": dev[best], "test": metrics("test", best)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outputs", type=Path, default=Path("outputs/classifiers"))
    args = parser.parse_args()
    lines = [
        "| job | data | head | adapter (init) | context | balance | adjust | test wF1 | test acc | test macro F1 "
        "| dev wF1 | train s | job s | first loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    posthoc = {}
    for folder in sorted((HERE / "runs").iterdir()):
        config = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"))
        m = json.loads((folder / "metrics.json").read_text())
        d = describe(config)
        context = f"{d['context']} ({d['layout']})" if d["context"] else "0"
        lines.append(
            f"| {folder.name} | {d['dataset']} | {d['head']} | {d['adapter']} | {context} | {d['balance']:g} | "
            f"{d['adjust']:g} | "
            f"{pct(m['test']['weighted_f1'])} | {pct(m['test']['accuracy'])} | {pct(m['test']['macro_f1'])} | "
            f"{pct(m['val']['weighted_f1'])} | {m['train']['seconds']:.0f} | {m['wall_time_s']:.0f} | "
            f"{m['train']['losses'][0]:.2f} |"
        )
        labels = m["data"]["labels"]
        prior = prior_of(labels, m["data"].get("train_counts"))
        if prior and not d["adjust"]:  # a job that adjusted its predictions already: not again
            result = adjusted(args.outputs / folder.name / "predictions.csv", labels, prior)
            if result:
                posthoc[folder.name] = {
                    "tau": result["tau"],
                    **{k: result["test"][k] for k in ("weighted_f1", "accuracy", "macro_f1")},
                }
    print("\n".join(lines))
    if posthoc:
        print("\nPost-hoc logit adjustment (tau chosen on dev by macro F1, applied to test):\n")
        print("| job | tau | test wF1 | test acc | test macro F1 |\n|---|---|---|---|---|")
        for name, r in posthoc.items():
            print(f"| {name} | {r['tau']:g} | {pct(r['weighted_f1'])} | {pct(r['accuracy'])} | {pct(r['macro_f1'])} |")
        (HERE / "posthoc.json").write_text(json.dumps(posthoc, indent=1) + "\n")


if __name__ == "__main__":
    main()
