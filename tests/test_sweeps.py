"""Real Hydra multiruns through `python -m emorec` on the tiny model: W&B groups, the report,
failure isolation, Optuna and the launchers."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from emorec.report import report
from tests.dataset_fixtures import write_dailydialog
from tests.meld_fixture import MELD_DIR
from tests.wandb_records import read_run


@pytest.fixture
def emorec(tiny_model, tmp_path):
    def call(*overrides, multirun=True, env=None):
        args = [sys.executable, "-m", "emorec", *(["-m"] if multirun else [])]
        args += [
            "model=hf",
            f"model.name_or_path={tiny_model}",
            *([] if any(o.startswith("dataset=") for o in overrides) else [f"dataset.data_dir={MELD_DIR}"]),
            "trainer.precision=fp32",
            "trainer.batch_size=4",
            "trainer.eval_batch_size=8",
            "trainer.epochs=1",
            "trainer.num_threads=1",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            *overrides,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return tmp_path / "sweep"

    return call


def test_two_value_multirun_groups_wandb_runs_and_reports(emorec):
    sweep = emorec("adapter.r=2,4", "logger=[wandb,csv]", "sweep_name=ranks")  # two loggers, one list
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    runs = [read_run(next((job / "wandb").glob("offline-run-*"))) for job in jobs]
    assert runs[0]["group"] == runs[1]["group"] and runs[0]["group"].startswith("ranks-")
    assert [r["config"]["adapter"]["r"] for r in runs] == [2, 4]
    assert [r["name"] for r in runs] == ["adapter.r=2", "adapter.r=4"]
    for job, logged in zip(jobs, runs):  # every logger gets the sweep's group and the job's name
        head = (job / "metrics.csv").read_text().splitlines()[1:3]
        assert head == [f",group,{logged['group']}", f",name,{logged['name']}"]
    for job, logged in zip(jobs, runs):
        metrics = json.loads((job / "metrics.json").read_text())
        assert logged["summary"]["val/weighted_f1"] == pytest.approx(metrics["val"]["weighted_f1"])
        assert json.loads((job / "status.json").read_text())["status"] == "ok"

    result = report(sweep)
    assert result["columns"][:2] == ["job", "adapter.r"] and len(result["rows"]) == 2
    assert [r[1] for r in result["rows"]] == ["2", "4"]
    assert sum(r[result["columns"].index("best")] == "*" for r in result["rows"]) == 1
    assert (sweep / "report.md").read_text().count("\n") == 4 and (sweep / "report.csv").is_file()
    assert result["plot"] and (sweep / "report.png").stat().st_size > 1000
    assert result["wandb"]  # the jobs logged to W&B, so the report did too
    report_run = read_run(next((sweep / "wandb").glob("offline-run-*")))
    assert report_run["group"] == runs[0]["group"]
    assert any(k.startswith("report/") for row in report_run["history"] for k in row)


def test_failing_job_keeps_the_others(emorec):
    sweep = emorec("adapter.r=4,0", "logger=none")  # PEFT rejects rank 0
    ok = json.loads((sweep / "0" / "status.json").read_text())
    failed = json.loads((sweep / "1" / "status.json").read_text())
    assert ok["status"] == "ok" and (sweep / "0" / "metrics.json").is_file()
    assert failed["status"] == "failed" and "r" in failed["error"]
    result = report(sweep)
    statuses = [r[result["columns"].index("status")] for r in result["rows"]]
    assert statuses == ["ok", "failed"]
    assert result["rows"][0][result["columns"].index("best")] == "*"


def test_sweep_across_datasets_reports_each_metric_of_record(emorec, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(MELD_DIR, root / "meld")
    write_dailydialog(root / "dailydialog")
    sweep = emorec("dataset=meld,dailydialog", "adapter=none", "logger=none", env={"EMOREC_DATA_DIR": str(root)})
    result = report(sweep)
    columns, rows = result["columns"], result["rows"]
    assert result["metric"] is None and "metric" in columns and "test_record" in columns
    assert [r[columns.index("metric")] for r in rows] == ["weighted_f1", "micro_f1_no_neutral"]
    for row in rows:
        saved = json.loads((sweep / row[0] / "metrics.json").read_text())
        assert row[columns.index("test_record")] == round(saved["test"][saved["metric"]], 4)
        assert row[columns.index("best")] == "*"  # the only job of its dataset


def test_single_run_user_error_fails_the_command(tmp_path):
    args = [
        sys.executable,
        "-m",
        "emorec",
        f"dataset.data_dir={tmp_path}",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'r'}",
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert json.loads((tmp_path / "r" / "status.json").read_text())["status"] == "failed"


def test_optuna_two_trials(emorec):
    sweep = emorec("+sweep=optuna", "hydra.sweeper.n_trials=2", "logger=none")
    results = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in results and "adapter.r" in results
    assert len([p for p in sweep.iterdir() if (p / "metrics.json").is_file()]) == 2


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_launchers(emorec, launcher):
    sweep = emorec(f"+launcher={launcher}", "adapter.r=2,4", "logger=none")
    metrics = sorted(sweep.rglob("metrics.json"))
    assert len(metrics) == 2
    assert {json.loads(m.read_text())["adapter"] for m in metrics} == {"lora"}
