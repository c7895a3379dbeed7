"""logger=tensorboard, mlflow and csv, alone or together: each records what W&B gets (the config,
per-step loss and learning rate, per-epoch validation metrics, final test metrics, the confusion
matrix, the sweep group), read back with each library's own reader; a resumed run continues the
same records."""

import csv
from pathlib import Path

import pytest

from emorec.run import run
from tests.test_resume import emorec

LOGGERS = "logger=[tensorboard,mlflow,csv]"


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's scalars, as its own EventAccumulator reads the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    found = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}
    found["images"], found["texts"] = tags["images"], tags["tensors"]
    found["config"] = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    return found


def mlflow_run(store: Path):
    """(the one run in the store as mlflow.search_runs gives it, the client)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(str(store))
    runs = mlflow.search_runs(experiment_names=["emorec"])
    assert len(runs) == 1
    return runs.iloc[0], MlflowClient(str(store))


def csv_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_tensorboard_mlflow_and_csv_together(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = tmp_path / "mlruns"
    groups = [f"logger.{name}.group=g1" for name in ("tensorboard", "mlflow", "csv")]
    cfg = make_cfg(LOGGERS, f"logger.mlflow.tracking_uri={store}", *groups, "trainer.epochs=2")
    metrics = run(cfg)
    out = Path(cfg.output_dir)
    steps = metrics["train"]["steps"]
    test_f1 = metrics["test"]["weighted_f1"]

    tb = scalars(out)
    assert [s for s, _ in tb["train/loss"]] == list(range(1, steps + 1)) and len(tb["train/lr"]) == steps
    assert len(tb["val/weighted_f1"]) == 2  # one per epoch
    assert tb["test/weighted_f1"][-1][1] == pytest.approx(test_f1)
    assert "confusion_matrix" in tb["images"] and "run/text_summary" in tb["texts"]
    assert "adapter:\n  name: lora" in tb["config"]  # the run's config, as text

    found, client = mlflow_run(store)
    assert found["tags.group"] == "g1" and found["params.adapter.name"] == "lora"
    assert found["metrics.test/weighted_f1"] == pytest.approx(test_f1)
    history = client.get_metric_history(found["run_id"], "train/loss")
    assert [m.step for m in history] == list(range(1, steps + 1))
    assert len(client.get_metric_history(found["run_id"], "val/weighted_f1")) == 2
    artifacts = {a.path for a in client.list_artifacts(found["run_id"])}
    assert {"confusion_matrix.png", "predictions.csv", "adapter"} <= artifacts
    assert (out / "mlflow_id").read_text().strip() == found["run_id"]

    rows = csv_rows(out)
    assert rows[0] == {"step": "", "name": "group", "value": "g1"}
    assert [int(r["step"]) for r in rows if r["name"] == "train/loss"] == list(range(1, steps + 1))
    assert len([r for r in rows if r["name"] == "val/weighted_f1"]) == 2
    assert float(next(r["value"] for r in rows if r["name"] == "test/weighted_f1")) == pytest.approx(test_f1)


def test_a_resumed_run_continues_each_loggers_records(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir, store = tmp_path / "run", tmp_path / "mlruns"
    settings = [LOGGERS, f"logger.mlflow.tracking_uri={store}", "trainer.log_every=1"]
    stopped = emorec(tiny_model, run_dir, *settings, interrupt=["TERM", "7"])
    assert stopped.returncode == 143, stopped.stderr
    resumed = emorec(tiny_model, run_dir, *settings, "resume=true")
    assert resumed.returncode == 0, resumed.stderr
    # Checkpointed at step 7 (SIGTERM): the first process logged 1-7, the second 8-10.
    assert [s for s, _ in scalars(run_dir)["train/loss"]] == list(range(1, 11))
    found, client = mlflow_run(store)  # one MLflow run across the interruption
    assert [m.step for m in client.get_metric_history(found["run_id"], "train/loss")] == list(range(1, 11))
    assert found["status"] == "FINISHED" and "metrics.test/weighted_f1" in found
    assert [int(r["step"]) for r in csv_rows(run_dir) if r["name"] == "train/loss"] == list(range(1, 11))
