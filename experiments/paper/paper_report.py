"""The paper's table from several sweeps (`make paper` runs it): per dataset and dialogue
context, the paper's numbers (paper_numbers.yaml) beside each system's test metrics, where ours
beats the paper, findings from our own columns and the setup behind every number; written to
report.md, report.csv and results.json, and into the README between its paper-results markers.

    python experiments/paper/paper_report.py --numbers experiments/paper/paper_numbers.yaml \
        --out experiments/paper --readme README.md <multirun dir> ...
"""

import argparse
import csv
import json
import os
import platform
import re
from pathlib import Path

from omegaconf import OmegaConf

from emorec.report import markdown_lines, read_jobs

# The paper's systems, in its column order: zero-shot, P-Tuning v2, LoRA; then the specialised model.
PAPER_SYSTEMS = {"none": "zero-shot", "ptuning_v2": "P-Tuning v2", "lora": "LoRA", "specialised": "specialised"}


def system_of(metrics: dict) -> str:
    """A job's column: its adapter for the general LLM, `specialised` for the encoder classifier
    (jobs from before decoders had heads: any classifier)."""
    return "specialised" if metrics.get("encoder", metrics["predict"] == "classify") else metrics["adapter"]


def paper_rows(jobs: list[dict], numbers: dict) -> tuple[list[str], list[list]]:
    """One row per dataset, dialogue context and metric: the paper's numbers (percent), then
    ours (test split, percent), for each system. Paper numbers go only on context-0 rows: the
    paper used no context."""
    ours: dict = {}
    for j in jobs:
        m = j["metrics"]
        if m and j["status"]["status"] == "ok":
            key = (m["dataset"], m["data"]["context_window"])
            ours.setdefault(key, {})[system_of(m)] = m
    systems = [s for s in PAPER_SYSTEMS if any(s in v for v in ours.values())]
    columns = ["dataset", "context", "metric", "test n"]
    columns += [f"paper {PAPER_SYSTEMS[s]}" for s in PAPER_SYSTEMS] + [f"ours {PAPER_SYSTEMS[s]}" for s in systems]
    # The numbers file's datasets in its order, then any other dataset the sweeps ran (its
    # metric of record and accuracy).
    specs = dict(numbers["datasets"])
    for m in (m for results in ours.values() for m in results.values()):
        specs.setdefault(m["dataset"], {"metrics": list(dict.fromkeys([m["metric"], "accuracy"]))})
    rows = []
    for dataset, spec in specs.items():
        paper = spec.get("paper") or {}
        for context in sorted(c for d, c in ours if d == dataset):
            results = ours[(dataset, context)]
            n = next(iter(results.values()))["test"]["n"]
            for i, metric in enumerate(spec["metrics"]):
                cited = [None if context else (paper.get(s) or [None] * len(spec["metrics"]))[i] for s in PAPER_SYSTEMS]
                mine = [_pct(results[s]["test"][metric]) if s in results else None for s in systems]
                rows.append([dataset, context, metric, n, *cited, *mine])
    return columns, rows


def _pct(x: float) -> float:
    return round(100 * x, 1)


def beats(columns: list[str], rows: list[list]) -> list[str]:
    """Where ours beats the paper: each of our systems against the paper's same system, and our
    best adapted system against the paper's best adapted one. Empty without paper numbers."""
    found = []
    for row in rows:
        cell = dict(zip(columns, row))
        where = f"{cell['dataset']} {cell['metric']}"
        for name in PAPER_SYSTEMS.values():
            theirs, mine = cell.get(f"paper {name}"), cell.get(f"ours {name}")
            if theirs is not None and mine is not None and mine > theirs:
                found.append(f"{where}: our {name} {mine} > the paper's {theirs}")
        adapted = [cell.get(f"ours {PAPER_SYSTEMS[s]}") for s in ("ptuning_v2", "lora")]
        theirs = [cell.get(f"paper {PAPER_SYSTEMS[s]}") for s in ("ptuning_v2", "lora")]
        if None not in adapted + theirs and max(adapted) > max(theirs):
            found.append(f"{where}: our best adapted {max(adapted)} > the paper's best adapted {max(theirs)}")
    return found


def findings(columns: list[str], rows: list[list]) -> list[str]:
    """What our own columns say, on each dataset's first metric: dialogue context against none
    (per system), and the best adapted LLM against the specialised model."""
    first = {}
    for row in rows:
        first.setdefault((row[0], row[1]), dict(zip(columns, row)))
    systems = [c for c in columns if c.startswith("ours ")]
    lines = []
    for (dataset, context), cell in first.items():
        base = first.get((dataset, 0))
        if context and base:
            deltas = [
                f"{s[5:]} {cell[s] - base[s]:+.1f}" for s in systems if cell[s] is not None and base[s] is not None
            ]
            lines.append(f"{dataset} {cell['metric']}, context {context} minus none: {', '.join(deltas)}")
    for (dataset, context), cell in first.items():
        adapted = [cell.get(f"ours {PAPER_SYSTEMS[s]}") for s in ("ptuning_v2", "lora")]
        adapted = [v for v in adapted if v is not None]
        specialised = cell.get("ours specialised")
        if adapted and specialised is not None:
            verdict = "above" if max(adapted) > specialised else "not above"
            lines.append(
                f"{dataset} (context {context}) {cell['metric']}: best adapted LLM {max(adapted)} is {verdict} "
                f"the specialised model's {specialised}"
            )
    return lines


def setup_notes(jobs: list[dict]) -> list[str]:
    """What stands behind the numbers, read from the jobs' own configs and metrics."""
    ok = [j for j in jobs if j["metrics"] and j["status"]["status"] == "ok"]
    configs = [OmegaConf.load(j["dir"] / "config.yaml") for j in ok]
    models = sorted({c.model.name for c in configs})
    steps = sorted({j["metrics"]["train"]["steps"] for j in ok if j["metrics"]["train"]})
    batch = sorted({c.trainer.batch_size for c in configs})
    seeds = sorted({c.seed for c in configs})
    dev = sorted({j["metrics"]["val"]["n"] for j in ok})
    seconds = sum(j["status"].get("seconds", 0) for j in jobs)
    failed = [j for j in jobs if j["status"]["status"] != "ok"]
    return [
        f"Models: {', '.join(models)}. Seeds: {', '.join(map(str, seeds))}. "
        f"Precision: {', '.join(sorted({j['metrics']['precision'] for j in ok}))}.",
        f"Training budget: {', '.join(map(str, steps))} optimizer steps of batch {', '.join(map(str, batch))} "
        f"per trained job (a seeded random sample of the train split); model selection on the first "
        f"{'/'.join(map(str, dev))} dev examples; test on the first `test n` test examples in file order.",
        f"Hardware: {_cpu()}, {os.cpu_count()} cores, {platform.system()}; no GPU used. "
        f"Compute: {len(jobs)} jobs, {seconds / 60:.1f} minutes in total"
        + (
            f"; {len(failed)} failed: " + "; ".join(f"{j['dir']}: {j['status'].get('error')}" for j in failed)
            if failed
            else ""
        )
        + ".",
    ]


def _cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    found = re.search(r"model name\s*:\s*(.+)", text)
    return found.group(1).strip() if found else "unknown CPU"


def paper_report(sweep_dirs: list[Path], numbers_file: Path, out: Path, readme: Path | None = None) -> dict:
    """The paper's table from several sweeps: `report.md` (notes, table, where ours beats the
    paper), `report.csv` and `results.json` in `out`; with `readme`, the same markdown replaces
    the part between the README's `<!-- paper-results -->` markers."""
    numbers = OmegaConf.to_container(OmegaConf.load(numbers_file))
    jobs = []
    for sweep_dir in sweep_dirs:
        found = read_jobs(sweep_dir)
        if not found:
            raise SystemExit(f"paper_report: error: no job folders (*/.hydra/overrides.yaml) under {sweep_dir}")
        jobs += [{**j, "dir": sweep_dir / j["job"]} for j in found]
    columns, rows = paper_rows(jobs, numbers)
    result = {
        "columns": columns,
        "rows": rows,
        "notes": setup_notes(jobs),
        "beats": beats(columns, rows),
        "findings": findings(columns, rows),
    }
    state = "transcribed" if numbers.get("transcribed") else "not yet transcribed: those columns are empty"
    lines = [f"- {note}" for note in result["notes"]]
    lines += [f"- Paper numbers: {numbers['source']} ({state}). Percent; ours are test-split metrics.", ""]
    lines += markdown_lines(columns, rows)
    lines += ["", "Where ours beats the paper:" if result["beats"] else "Where ours beats the paper: no paper numbers."]
    lines += [f"- {w}" for w in result["beats"]]
    lines += ["", "Our own columns, on each dataset's first metric:" if result["findings"] else ""]
    lines += [f"- {f}" for f in result["findings"]]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    with open(out / "report.csv", "w", newline="") as f:
        csv.writer(f).writerows([columns, *rows])
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    if readme is not None:
        replace_section(readme, text)
    return result


def replace_section(readme: Path, text: str) -> None:
    start, end = "<!-- paper-results:start -->", "<!-- paper-results:end -->"
    old = readme.read_text()
    if start not in old or end not in old:
        raise SystemExit(f"paper_report: error: {readme} has no {start} ... {end} section; add the two markers")
    head, rest = old.split(start, 1)
    readme.write_text(f"{head}{start}\n{text}{end}{rest.split(end, 1)[1]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, nargs="+", help="multirun folders of the paper presets")
    parser.add_argument("--numbers", type=Path, required=True, help="the paper's numbers (paper_numbers.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="where report.md, report.csv and results.json go")
    parser.add_argument("--readme", type=Path, help="a README whose paper-results section to rewrite")
    args = parser.parse_args(argv)
    paper_report(args.sweep_dir, args.numbers, args.out, args.readme)
    print((args.out / "report.md").read_text(), end="")


if __name__ == "__main__":
    main()
