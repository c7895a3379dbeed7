"""logger=wandb (the default): a Weights & Biases run, offline unless credentials are found."""

import netrc
import os
import secrets
import string
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
    variable or logger.mode). Offline runs sync later with `wandb sync <dir>`. The run's id is
    kept in the run directory (wandb_id), so a resumed run continues the same W&B run."""

    def __init__(
        self,
        run_config: dict,
        dir: str,
        mode: str | None = None,
        tags: list | tuple = (),
        log_model: bool = True,
        resume: bool = False,
        **init,
    ):
        """`init`: the rest of conf/logger/wandb.yaml (project, entity, group, name), wandb.init's
        own arguments."""
        import wandb

        self.wandb, self.log_model_artifact = wandb, log_model
        mode = mode or os.environ.get("WANDB_MODE") or ("online" if has_wandb_credentials() else "offline")
        Path(dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            id=run_id(Path(dir), resume),
            resume="allow",
            mode=mode,
            tags=list(tags),
            config=run_config,
            dir=dir,
            reinit="finish_previous",
            **init,
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

    def log_model(self, path: Path, metadata: dict) -> None:
        """The trained adapter (or model) folder as an artifact of type model, named after the
        run (as W&B's own integrations name theirs); a resumed run adds a version."""
        if self.log_model_artifact:
            artifact = self.wandb.Artifact(f"model-{self.run.id}", type="model", metadata=metadata)
            artifact.add_dir(str(path))
            self.run.log_artifact(artifact)

    def finish(self) -> None:
        self.run.finish()


def run_id(out: Path, resume: bool) -> str:
    """The W&B run id of this run directory: the one saved there when resuming, else a new one
    (saved for a later resume). Drawn from the OS, not from the seeded generators: runs of
    the same seed must not share an id."""
    path = out / "wandb_id"
    if resume and path.is_file() and (saved := path.read_text().strip()):
        return saved
    run = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    path.write_text(run + "\n")
    return run
