"""logger=csv: metrics.csv in the run directory, the choice without a dependency."""

import csv
from pathlib import Path

from emorec.loggers.scalars import ScalarLogger

FILE = "metrics.csv"


class CSVLogger(ScalarLogger):
    """`<run dir>/metrics.csv`, one row per value: `step,name,value` (the sweep group and name
    first, without a step; final metrics at the last step). The config, the predictions and the
    confusion matrix are the run directory's own config.yaml, predictions.csv and
    confusion_matrix.png. Each row is flushed as written; a resumed run appends."""

    def __init__(self, run_config: dict, dir: str, resume: bool = False, group=None, name=None):
        path = Path(dir) / FILE
        fresh = not (resume and path.is_file())
        self.file = open(path, "w" if fresh else "a", newline="")
        self.writer = csv.writer(self.file)
        if fresh:
            self.writer.writerow(["step", "name", "value"])
            self.writer.writerows([["", "group", group or ""], ["", "name", name or ""]])
            self.file.flush()

    def write(self, values: dict[str, float], step: int) -> None:
        self.writer.writerows([step, k, v] for k, v in values.items())
        self.file.flush()

    def log_predictions(self, *args, **kwargs) -> None:
        pass  # predictions.csv and confusion_matrix.png are in the run directory already

    def log_model(self, path: Path, metadata: dict) -> None:
        pass  # as is the adapter (or model)

    def finish(self) -> None:
        self.file.close()
