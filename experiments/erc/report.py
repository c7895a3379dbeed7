"""The erc study's table from its committed results (runs/<job>/metrics.json): each job's test
weighted F1 (MELD's and EmoryNLP's metric of record), macro F1, dev weighted F1, the weakest
classes' F1, training time and prompt length.

    python -m experiments.erc.report
"""

from pathlib import Path

from experiments.common import read_results

HERE = Path(__file__).parent
COLUMNS = (
    "| job | test weighted F1 | test macro F1 | dev weighted F1 | disgust F1 | fear F1 | training s | prompt tokens |"
)


def row(name: str, metrics: dict) -> str:
    test, per_class = metrics["test"], metrics["test"]["f1_per_class"]
    weak = [f"{100 * per_class[c]:.1f}" if c in per_class else "-" for c in ("disgust", "fear")]
    tokens = metrics.get("prompt_tokens", {}).get("train")
    cells = [
        f"{100 * test['weighted_f1']:.1f}",
        f"{100 * test['macro_f1']:.1f}",
        f"{100 * metrics['val']['weighted_f1']:.1f}",
    ]
    cells += [*weak, f"{metrics['train']['seconds']:.0f}", f"{tokens:.1f}" if tokens else "-"]
    return f"| {name} | " + " | ".join(cells) + " |"


def table(results: Path = HERE / "runs") -> str:
    found = read_results(results)
    lines = [COLUMNS, "|" + "---|" * COLUMNS.count(" | ") + "---|"]
    return "\n".join(lines + [row(name, job["metrics"]) for name, job in found.items()]) + "\n"


if __name__ == "__main__":
    print(table(), end="")
