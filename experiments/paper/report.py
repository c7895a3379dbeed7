"""The paper's table from the study's results folder (study.py): per dataset and metric, the
paper's ChatGLM2-6B numbers and its best cited specialised model (paper_numbers.yaml) beside ours
on the full test split; a dev-chosen configuration per family with its seed spread; where ours
beats the paper's zero-shot, adapted or cited numbers, or reaches 90 % of the adapted ones; the
dev selection; the setup behind every number. Written to report.md, report.csv and results.json
beside the results, and into the README between its paper-results markers.

    python -m experiments.paper.report [--results experiments/paper/runs/cpu_full] [--readme README.md]
"""

import argparse
import collections
import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from emorec.report import markdown_lines
from experiments.common import read_results
from experiments.paper.study import DATASETS, LLM, MINILM, SEEDS, best, dev_score, jobs

HERE = Path(__file__).parent
PAPER = {"none": "zero-shot", "ptuning_v2": "P-Tuning v2", "lora": "LoRA"}
# Our columns: the job (suffix of <dataset>-) behind each; `best` columns are resolved per dataset.
OURS = {
    "zero-shot": "zeroshot",
    "P-Tuning v2 (score)": "ptv2_score",
    "P-Tuning v2 (head)": "ptv2_head",
    "LoRA (score)": "lora_score",
    "LoRA (head)": "lora_head",
    "MiniLM": "minilm",
    "best LLM + context": "ctx1",
}
ADAPTED = ["P-Tuning v2 (score)", "P-Tuning v2 (head)", "LoRA (score)", "LoRA (head)"]


@dataclass
class Cell:
    """Our test metric (percent) over the seeds that ran; `chosen`: the family's dev-best."""

    values: list[float]
    chosen: bool = False

    @property
    def mean(self) -> float:
        return round(statistics.fmean(self.values), 1)

    @property
    def sd(self) -> float | None:
        return round(statistics.stdev(self.values), 1) if len(self.values) > 1 else None

    def text(self, bold: bool = True) -> str:
        """`61.2¹` for one run, `61.2 ± 0.4` over three seeds; bold when dev-chosen."""
        n = len(self.values)
        spread = "¹" if n == 1 else f" ± {self.sd:.1f}" + ("" if n == len(SEEDS) + 1 else f" ({n} seeds)")
        body = f"{self.mean:.1f}{spread}"
        return f"**{body}**" if bold and self.chosen else body


def _pct(x: float) -> float:
    return 100 * x


def our_cells(results: dict, dataset: str, metric: str) -> dict[str, Cell]:
    """Each of our columns that has a finished job on this dataset: one seed, or the dev-chosen
    configuration's seeds 42-44 (the LLM's and MiniLM's)."""

    def test(name: str) -> float:
        return _pct(results[name]["metrics"]["test"][metric])

    chosen = {"llm": best(results, dataset, LLM), "minilm": best(results, dataset, MINILM)}
    cells = {}
    for column, job in OURS.items():
        if job == "minilm":
            name = chosen["minilm"]
        elif job == "ctx1":
            name = f"{chosen['llm']}-ctx1" if chosen["llm"] else None
        else:
            name = f"{dataset}-{job}"
        if name is None or name not in results:
            continue
        seeded = name in chosen.values()
        values = [test(name)] + [test(f"{name}-s{s}") for s in SEEDS if seeded and f"{name}-s{s}" in results]
        cells[column] = Cell(values, chosen=seeded)
    return cells


def paper_cells(spec: dict, i: int) -> tuple[dict[str, float], tuple[float, str] | None]:
    """The paper's numbers for metric i: per ChatGLM2 system, and its best cited specialised model."""
    paper = {PAPER[s]: v[i] for s, v in (spec.get("paper") or {}).items() if v[i] is not None}
    cited = [(v[i], model) for model, v in (spec.get("specialised") or {}).items() if v[i] is not None]
    return paper, max(cited) if cited else None


def table_rows(results: dict, numbers: dict) -> list[dict]:
    """One row per dataset and metric: the paper's numbers, ours, and what differs."""
    rows = []
    specs = numbers["datasets"]
    for dataset, spec in specs.items():
        for i, metric in enumerate(spec["metrics"]):
            ours = our_cells(results, dataset, metric)
            done = finished(results, dataset)
            paper, specialised = paper_cells(spec, i)
            rows.append(
                dict(
                    dataset=dataset,
                    metric=metric,
                    n=done[0]["test"]["n"] if done else None,
                    record=bool(done) and metric == done[0]["metric"],
                    paper=paper,
                    specialised=specialised,
                    ours=ours,
                    differs="" if i else spec.get("differs", ""),
                )
            )
    return rows


# The comparison lists of the report, with their headings.
COMPARED = {
    "zero_shot": "Where ours beats the paper's zero-shot ChatGLM2-6B",
    "adapted": "Where ours beats the paper's adapted ChatGLM2-6B",
    "ninety": "Where our dev-chosen LLM reaches 90 % of the paper's best adapted number (without beating it)",
    "specialised": "Where our MiniLM beats the specialised models the paper cites",
}


def comparisons(rows: list[dict]) -> dict[str, list[str]]:
    """Ours against the paper, on every row with both: our zero-shot and our dev-chosen LLM
    against the paper's zero-shot; each adapted cell against the paper's same method, and the
    dev-chosen LLM against the paper's best adapted number (beaten, or reached to 90 %); MiniLM
    against the best specialised model the paper cites."""
    found: dict[str, list[str]] = {key: [] for key in COMPARED}
    for row in rows:
        where, paper, ours = f"{row['dataset']} {row['metric']}", row["paper"], row["ours"]
        chosen = next((ours[c] for c in ADAPTED if c in ours and ours[c].chosen), None)
        if "zero-shot" in paper:
            for name, cell in (("zero-shot", ours.get("zero-shot")), ("dev-chosen LLM", chosen)):
                if cell and cell.mean > paper["zero-shot"]:
                    line = (
                        f"{where}: our {name} {cell.text(bold=False)} > the paper's zero-shot {paper['zero-shot']:.2f}"
                    )
                    found["zero_shot"].append(line)
        for column in ADAPTED:
            method = column.split(" (")[0]
            if column in ours and method in paper and ours[column].mean > paper[method]:
                line = (
                    f"{where}: our {column} {ours[column].text(bold=False)} > the paper's {method} {paper[method]:.2f}"
                )
                found["adapted"].append(line)
        theirs = [paper[m] for m in ("P-Tuning v2", "LoRA") if m in paper]
        if chosen and theirs:
            top = max(theirs)
            line = f"{where}: our dev-chosen LLM {chosen.text(bold=False)}, the paper's best adapted {top:.2f}"
            line += f" ({chosen.mean / top:.0%})"
            if chosen.mean > top:
                found["adapted"].append(line)
            elif chosen.mean >= 0.9 * top:
                found["ninety"].append(line)
        if "MiniLM" in ours and row["specialised"] and ours["MiniLM"].mean > row["specialised"][0]:
            value, model = row["specialised"]
            found["specialised"].append(f"{where}: our MiniLM {ours['MiniLM'].text(bold=False)} > {model} {value:.2f}")
    return found


def findings(rows: list[dict]) -> list[str]:
    """What our own columns say on each dataset's metric of record (the one selection uses): the
    dev-chosen LLM against zero-shot and MiniLM; dialogue context against none (both seed 42)."""
    lines = []
    for row in (r for r in rows if r["record"]):
        ours = row["ours"]
        chosen = next((c for c in ADAPTED if c in ours and ours[c].chosen), None)
        if chosen is None:
            continue
        where, value = f"{row['dataset']} {row['metric']}", ours[chosen]
        parts = [f"dev-chosen {chosen} {value.text(bold=False)}"]
        if "zero-shot" in ours:
            parts.append(f"{value.mean - ours['zero-shot'].mean:+.1f} over zero-shot")
        if "MiniLM" in ours:
            parts.append(f"{value.mean - ours['MiniLM'].mean:+.1f} against MiniLM ({ours['MiniLM'].text(bold=False)})")
        if "best LLM + context" in ours:
            delta = ours["best LLM + context"].values[0] - value.values[0]
            parts.append(f"{delta:+.1f} with one turn of context (seed 42 both)")
        lines.append(f"{where}: " + "; ".join(parts))
    return lines


def selection(results: dict) -> tuple[list[str], list[list]]:
    """The dev metric (percent, seed 42) of every configuration the seeds were chosen among."""
    configs = {**LLM, **MINILM}
    columns = ["dataset", "dev metric", *configs, "LLM chosen", "MiniLM chosen"]
    rows = []
    for d in studied(results):
        dev = [
            round(_pct(dev_score(results[f"{d}-{c}"]["metrics"])), 1) if f"{d}-{c}" in results else None
            for c in configs
        ]
        metric = finished(results, d)[0]["metric"]
        chosen = [(best(results, d, f) or "").removeprefix(f"{d}-") for f in (LLM, MINILM)]
        rows.append([d, metric, *dev, *chosen])
    return columns, rows


def studied(results: dict) -> list[str]:
    """The study's datasets that have a finished job."""
    return [d for d in DATASETS if finished(results, d)]


def finished(results: dict, dataset: str) -> list[dict]:
    """The metrics of the dataset's finished jobs."""
    return [r["metrics"] for name, r in results.items() if name.startswith(f"{dataset}-")]


def setup_notes(results: dict) -> list[str]:
    """What stands behind the numbers, read from the jobs' own configs and metrics."""
    configs = [r["config"] for r in results.values()]
    metrics = [r["metrics"] for r in results.values()]
    trained = [m["train"] for m in metrics if m.get("train")]
    budget = sorted({_budget(c) for c in configs if c["adapter"]["train"]})
    examples = sorted(t["examples"] for t in trained) or [0]
    seconds = sum(map(wall_seconds, metrics))
    return [
        f"Models: {', '.join(sorted({m['model'] for m in metrics}))}; precision "
        f"{', '.join(sorted({m['precision'] for m in metrics}))}; batch "
        f"{', '.join(sorted({str(c['trainer']['batch_size']) for c in configs}))}.",
        f"Budget: {'; '.join(budget)}: {examples[0]:,}-{examples[-1]:,} training examples per trained job "
        "(a seeded random sample where capped); model selection on the whole dev split; test on the whole "
        "test split (`test n`).",
        f"Seeds: 42 for every cell; the dev-chosen LLM configuration and MiniLM learning rate per dataset "
        f"also with {', '.join(map(str, SEEDS))} (mean ± sample standard deviation); ¹ marks a single run.",
        f"Hardware, one job at a time: {machines(results)}. Compute: "
        f"{len(results)} jobs, {seconds / 3600:.1f} hours of wall time in total.",
        *precisions(results),
        progress(results),
    ]


def progress(results: dict) -> str:
    """How much of the plan is done, and how many families' seeds wait for their dev results
    (while any wait, the plan still grows: each adds its best configuration's seeds)."""
    planned, waiting = jobs(results, datasets=studied(results))
    if waiting:
        return (
            f"Progress: {len(results)} of the {len(planned)} jobs planned so far are done; "
            f"seeds wait for dev results in {_count(len(waiting), 'family', 'families')}."
        )
    done = "all" if all(j.name in results for j in planned) else f"{len(results)} of the"
    return f"Progress: {done} {len(planned)} planned jobs are done."


def _budget(config: dict) -> str:
    trainer, cap = config["trainer"], config["dataset"]["max_train"]
    steps = f"at most {trainer['max_steps']} steps" if trainer["max_steps"] else f"{trainer['epochs']} epoch(s)"
    return steps + (f" over at most {cap:,} training examples" if cap else " over the whole training split")


def machines(results: dict) -> str:
    """Jobs and wall time per machine and precision: the run's own hardware record, or for runs
    made before it was recorded, what `trainer.precision=auto` chose (bf16 only on a CPU that
    computes it natively: AVX-512 BF16 or AMX)."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in results.values():
        m, hw = r["metrics"], r["metrics"].get("hardware")
        if hw and hw["device"] == "cpu":
            where = f"{hw['name']} ({hw['cpu_isa']}, {_count(hw['threads'], 'thread')})"
        elif hw:
            where = f"{_count(hw['processes'], hw['name'])}"
        elif r["config"]["trainer"]["precision"] == "auto":
            native = "with" if m["precision"] == "bf16" else "without"
            where = f"a CPU {native} native bf16 (read from the run's auto precision: it predates hardware records)"
        else:
            where = "a machine the run did not record"
        groups.setdefault((m["precision"], where), []).append(wall_seconds(m))
    return "; ".join(
        f"{_count(len(times), 'job')} in {precision} on {where}, {sum(times) / 3600:.1f} h"
        for (precision, where), times in sorted(groups.items(), key=lambda g: -len(g[1]))
    )


def wall_seconds(metrics: dict) -> float:
    """A job's wall time. Runs resumed before emorec carried wall time across processes recorded
    only their last process's; their training time, always carried, is then the better bound."""
    return max(metrics["wall_time_s"], (metrics.get("train") or {}).get("seconds", 0.0))


def _count(n: int, thing: str, things: str | None = None) -> str:
    return f"{n} {thing if n == 1 else things or thing + 's'}"


def precisions(results: dict) -> list[str]:
    """Where the precision is mixed, which jobs ran in the rarer one (rounding differs, so the
    same seed need not give the same metrics across them)."""
    counts = collections.Counter(r["metrics"]["precision"] for r in results.values())
    if len(counts) < 2:
        return []
    rare = min(counts, key=counts.get)
    jobs_in = {
        d: [
            n.removeprefix(f"{d}-")
            for n, r in results.items()
            if n.startswith(f"{d}-") and r["metrics"]["precision"] == rare
        ]
        for d in DATASETS
    }
    listed = "; ".join(f"{d}: {', '.join(names)}" for d, names in jobs_in.items() if names)
    others = ", ".join(p for p in counts if p != rare)
    return [f"In {rare} ({_count(counts[rare], 'job')}; the others in {others}): {listed}."]


def markdown(rows: list[dict], numbers: dict, notes: list[str], compared: dict, found: list[str], chosen) -> str:
    columns = ["dataset", "metric", "test n", *(f"paper {s}" for s in PAPER.values()), "paper specialised"]
    columns += [f"ours {c}" for c in OURS] + ["differs from the paper"]
    cells = []
    for r in rows:
        spec = f"{r['specialised'][0]:.2f} {r['specialised'][1]}" if r["specialised"] else ""
        paper = [f"{r['paper'][s]:.2f}" if s in r["paper"] else "" for s in PAPER.values()]
        ours = [r["ours"][c].text() if c in r["ours"] else "" for c in OURS]
        cells.append([r["dataset"], r["metric"], r["n"] or "", *paper, spec, *ours, r["differs"]])
    state = "transcribed" if numbers.get("transcribed") else "not yet transcribed: those columns are empty"
    lines = [f"- {note}" for note in notes]
    lines += [f"- Paper numbers: {numbers['source']} ({state}): ChatGLM2-6B, percent, test split.", ""]
    lines += markdown_lines(columns, cells)
    lines += [
        "",
        "Bold: the dev-chosen configuration (its seeds); context rows: one previous turn after the instruction.",
    ]
    for key, heading in COMPARED.items():
        lines += ["", f"{heading}:"] + ([f"- {w}" for w in compared[key]] or ["- nowhere yet."])
    lines += ["", "Our own columns, on each dataset's metric of record:"]
    lines += [f"- {f}" for f in found] or ["- no dataset has its whole LLM family yet."]
    lines += ["", "Selection on dev (seed 42, percent):", ""]
    lines += markdown_lines(*chosen)
    return "\n".join(lines) + "\n"


def write_report(results_dir: Path, numbers_file: Path, out: Path, readme: Path | None = None) -> dict:
    results = read_results(results_dir)
    if not results:
        raise SystemExit(f"report: error: no finished jobs (*/metrics.json) in {results_dir}; run study.py run first")
    numbers = OmegaConf.to_container(OmegaConf.load(numbers_file))
    rows = table_rows(results, numbers)
    notes, compared, found, chosen = setup_notes(results), comparisons(rows), findings(rows), selection(results)
    text = markdown(rows, numbers, notes, compared, found, chosen)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    flat = [
        {
            "dataset": r["dataset"],
            "metric": r["metric"],
            "test_n": r["n"],
            **{f"paper {s}": v for s, v in r["paper"].items()},
            "paper specialised": r["specialised"][0] if r["specialised"] else None,
            **{f"ours {c}": v.mean for c, v in r["ours"].items()},
            **{f"ours {c} sd": v.sd for c, v in r["ours"].items() if v.sd is not None},
        }
        for r in rows
    ]
    fields = list(dict.fromkeys(k for row in flat for k in row))
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(flat)
    (out / "results.json").write_text(
        json.dumps({"rows": flat, "notes": notes, **compared, "findings": found}, indent=1) + "\n"
    )
    if readme is not None:
        replace_section(readme, text)
    return {"rows": rows, "notes": notes, **compared, "findings": found, "text": text}


def replace_section(readme: Path, text: str) -> None:
    start, end = "<!-- paper-results:start -->", "<!-- paper-results:end -->"
    old = readme.read_text()
    if start not in old or end not in old:
        raise SystemExit(f"report: error: {readme} has no {start} ... {end} section; add the two markers")
    head, rest = old.split(start, 1)
    readme.write_text(f"{head}{start}\n{text}{end}{rest.split(end, 1)[1]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "runs" / "cpu_full", help="the study's results folder")
    parser.add_argument("--numbers", type=Path, default=HERE / "paper_numbers.yaml", help="the paper's numbers")
    parser.add_argument("--out", type=Path, help="where report.md, report.csv and results.json go (default: --results)")
    parser.add_argument("--readme", type=Path, help="a README whose paper-results section to rewrite")
    args = parser.parse_args(argv)
    print(write_report(args.results, args.numbers, args.out or args.results, args.readme)["text"], end="")


if __name__ == "__main__":
    main()
