"""logger=mlflow: an MLflow run, in a local file store by default (`mlflow ui --backend-store-uri
<store>`) or on a tracking server (logger.mlflow.tracking_uri)."""

import csv
import os
import tempfile
import time
from pathlib import Path

from emorec.loggers.scalars import ScalarLogger, require
from emorec.settings import flatten

ID_FILE = "mlflow_id"
MAX_PARAM = 6000  # MLflow's limit on a parameter's value


class MLflowLogger(ScalarLogger):
    """An MLflow run in experiment `experiment`: the config as parameters (dotted keys), metrics
    at the optimizer step, the sweep group as the `group` tag, the confusion matrix, the
    predictions and (log_model) the trained adapter as artifacts. Its id is kept in the run
    directory (mlflow_id), so a resumed run continues the same MLflow run."""

    def __init__(
        self,
        run_config: dict,
        dir: str,
        resume: bool = False,
        tracking_uri: str | None = None,
        experiment: str = "emorec",
        group=None,
        name=None,
        log_model: bool = True,
    ):
        # MLflow 3 reports its own usage to Databricks unless told not to; a run sends what it
        # logs to the store it was given and nothing else, unless MLFLOW_DISABLE_TELEMETRY says so.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        require("mlflow", "mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        tracking_uri = tracking_uri or str(Path("mlruns").resolve())
        if "://" not in tracking_uri or tracking_uri.startswith("file:"):
            # MLflow 3 keeps its file store only on request; it is the store that needs no server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client, self.log_model_artifacts = MlflowClient(tracking_uri), log_model
        id_file = Path(dir) / ID_FILE
        if resume and id_file.is_file() and (saved := id_file.read_text().strip()):
            self.run_id = saved
            self.client.update_run(saved, status="RUNNING")  # it was ended when the run stopped
            return
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        tags = {"group": group} if group else {}
        self.run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        id_file.write_text(self.run_id + "\n")
        params = [Param(k, str(v)[:MAX_PARAM]) for k, v in flatten(run_config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def write(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log_predictions(self, columns, rows, labels, golds, preds, image: str | None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "predictions.csv"
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows([columns, *rows])
            self.client.log_artifact(self.run_id, str(path))
        if image:
            self.client.log_artifact(self.run_id, image)

    def log_model(self, path: Path, metadata: dict) -> None:
        if self.log_model_artifacts:
            self.client.log_artifacts(self.run_id, str(path), artifact_path=Path(path).name)

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)
