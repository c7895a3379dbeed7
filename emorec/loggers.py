"""Experiment loggers. `logger=wandb` (default) and `logger=none` pick one of these two; they
share the same four methods and nothing else."""

import netrc
import os
from pathlib import Path


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class WandbLogger:
    """A W&B run: offline unless credentials are found or a mode is set (the WANDB_MODE
    variable or logger.mode). Offline runs sync later with `wandb sync <dir>`."""

    def __init__(
        self,
        run_config: dict,
        dir: str,
        project: str = "emorec",
        entity: str | None = None,
        mode: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: list | tuple = (),
    ):
        import wandb

        self.wandb = wandb
        mode = mode or os.environ.get("WANDB_MODE") or ("online" if has_wandb_credentials() else "offline")
        Path(dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            entity=entity,
            mode=mode,
            group=group,
            name=name,
            tags=list(tags),
            config=run_config,
            dir=dir,
            reinit="finish_previous",
        )

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        self.run.summary.update(metrics)

    def log_predictions(
        self, columns: list[str], rows: list[list], labels: list[str], golds, preds, image: str | None
    ) -> None:
        """The predictions table, W&B's interactive confusion matrix and the PNG."""
        data = {"predictions": self.wandb.Table(columns=columns, data=rows)}
        valid = [(g, p) for g, p in zip(golds, preds) if p >= 0]
        if valid:
            y_true, y_pred = zip(*valid)
            data["confusion_matrix"] = self.wandb.plot.confusion_matrix(
                y_true=list(y_true), preds=list(y_pred), class_names=labels
            )
        if image:
            data["confusion_matrix_png"] = self.wandb.Image(image)
        self.run.log(data)

    def finish(self) -> None:
        self.run.finish()


class NullLogger:
    """Logs nothing."""

    def __init__(self, **_):
        pass

    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        pass

    def log_predictions(self, *args, **kwargs) -> None:
        pass

    def finish(self) -> None:
        pass
