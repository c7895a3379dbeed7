"""`emorec report <multirun dir>`: one table of a sweep's jobs, best marked.

Reads each job folder (`.hydra/overrides.yaml`, `status.json`, `metrics.json`) and writes
`report.md`, `report.csv` and, when one swept value is numeric, `report.png` (the metric of
record against it) into the multirun folder. Failed jobs are listed with their error.
(The paper's study builds its own table from its results folder: experiments/paper/report.py.)
"""

import argparse
import csv
import json
import math
from pathlib import Path

from omegaconf import OmegaConf

from emorec.upgrade import upgrade


def read_jobs(sweep_dir: Path) -> list[dict]:
    jobs = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml"), key=lambda p: _num(p.parent.parent.name)):
        job_dir = overrides_file.parent.parent
        overrides = dict(o.split("=", 1) for o in OmegaConf.load(overrides_file) if "=" in o)
        status = _json(job_dir / "status.json") or {"status": "unknown"}
        metrics = _json(job_dir / "metrics.json")
        if metrics and status["status"] == "unknown":
            status = {"status": "ok"}
        jobs.append({"job": job_dir.name, "overrides": overrides, "status": status, "metrics": metrics})
    return jobs


def _num(name: str) -> float:
    return int(name) if name.isdigit() else math.inf


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def table(jobs: list[dict]) -> tuple[list[str], list[list], str | None]:
    """Columns, rows and the name of the metric of record (None when the jobs span datasets
    with different ones: then a `metric` column names each row's, and the best job is marked
    per dataset)."""
    keys = sorted({k for j in jobs for k in j["overrides"]})
    swept = [k for k in keys if len({j["overrides"].get(k) for j in jobs}) > 1] or keys
    used = {j["metrics"]["metric"] for j in jobs if j["metrics"]}
    metric = used.pop() if len(used) == 1 else None
    record = metric or "record"
    columns = [
        "job",
        *swept,
        "status",
        *([] if metric else ["metric"]),
        "trainable_params",
        f"val_{record}",
        f"test_{record}",
        "test_accuracy",
        "train_s",
        "wall_s",
        "best",
        "error",
    ]
    ok = [j for j in jobs if j["metrics"] and j["status"]["status"] == "ok"]
    best = set()
    for dataset in {j["metrics"]["dataset"] for j in ok}:
        group = [j for j in ok if j["metrics"]["dataset"] == dataset]
        best.add(max(group, key=lambda j: j["metrics"]["val"][j["metrics"]["metric"]])["job"])
    rows = []
    for j in jobs:
        m = j["metrics"] or {}
        own = m.get("metric")
        rows.append(
            [
                j["job"],
                *(j["overrides"].get(k, "") for k in swept),
                j["status"]["status"],
                *([] if metric else [own]),
                m.get("trainable_params"),
                _get(m, "val", own),
                _get(m, "test", own),
                _get(m, "test", "accuracy"),
                _round((m.get("train") or {}).get("seconds")),
                _round(m.get("wall_time_s")),
                "*" if j["job"] in best else "",
                j["status"].get("error", ""),
            ]
        )
    return columns, rows, metric


def _get(m: dict, split: str, key: str):
    return round(m[split][key], 4) if m and split in m else None


def _round(x):
    return None if x is None else round(x, 1)


def markdown_lines(columns: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]


def write_markdown(path: Path, columns: list[str], rows: list[list]) -> None:
    path.write_text("\n".join(markdown_lines(columns, rows)) + "\n")


def plot(path: Path, columns: list[str], rows: list[list], metric: str) -> bool:
    """The metric of record against the first numeric swept value; False when there is none."""
    swept = columns[1 : columns.index("status")]
    for key in swept:
        i = columns.index(key)
        points = [
            (float(r[i]), r[columns.index(f"val_{metric}")], r[columns.index(f"test_{metric}")])
            for r in rows
            if _is_number(r[i]) and r[columns.index(f"val_{metric}")] is not None
        ]
        if len(points) < 2 or len(points) != len([r for r in rows if r[columns.index("status")] == "ok"]):
            continue
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        points.sort()
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="val")
        ax.plot([p[0] for p in points], [p[2] for p in points], "s--", label="test")
        if all(p[0] > 0 for p in points):
            ax.set_xscale("log", base=2)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return True
    return False


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def report(sweep_dir: Path) -> dict:
    jobs = read_jobs(sweep_dir)
    if not jobs:
        raise SystemExit(f"emorec.report: error: no job folders (*/.hydra/overrides.yaml) under {sweep_dir}")
    columns, rows, metric = table(jobs)
    write_markdown(sweep_dir / "report.md", columns, rows)
    with open(sweep_dir / "report.csv", "w", newline="") as f:
        csv.writer(f).writerows([columns, *rows])
    plotted = metric is not None and plot(sweep_dir / "report.png", columns, rows, metric)
    logged = log_to_wandb(sweep_dir, jobs, columns, rows, plotted)
    return {"columns": columns, "rows": rows, "metric": metric, "plot": plotted, "wandb": logged}


def log_to_wandb(sweep_dir: Path, jobs: list[dict], columns: list[str], rows: list[list], plotted: bool) -> bool:
    """When the jobs logged to W&B, a `report` run in their group gets the table and plot."""
    configs = [sweep_dir / j["job"] / "config.yaml" for j in jobs if (sweep_dir / j["job"] / "config.yaml").is_file()]
    if not configs:
        return False
    loggers = upgrade(OmegaConf.to_container(OmegaConf.load(configs[0]))).get("logger") or {}
    logger_cfg = next((n for n in loggers.values() if n.get("_target_") == "emorec.loggers.WandbLogger"), None)
    if logger_cfg is None:
        return False
    import wandb

    from emorec.loggers import WandbLogger

    logger = WandbLogger(
        run_config={"sweep_dir": str(sweep_dir)},
        dir=str(sweep_dir),
        project=logger_cfg.get("project"),
        entity=logger_cfg.get("entity"),
        mode=logger_cfg.get("mode"),
        group=logger_cfg.get("group"),
        name="report",
        tags=["report"],
    )
    data = {"report": wandb.Table(columns=columns, data=[[None if v == "" else v for v in r] for r in rows])}
    if plotted:
        data["report_plot"] = wandb.Image(str(sweep_dir / "report.png"))
    logger.run.log(data)
    logger.finish()
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="emorec report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder, e.g. multirun/2026-11-24/10-00-00")
    args = parser.parse_args(argv)
    sweep_dir = args.sweep_dir
    result = report(sweep_dir)
    print((sweep_dir / "report.md").read_text(), end="")
    failed = [r for r in result["rows"] if r[result["columns"].index("status")] != "ok"]
    if failed:
        print(f"{len(failed)} job(s) failed: " + "; ".join(f"job {r[0]}: {r[-1]}" for r in failed))


if __name__ == "__main__":
    main()
