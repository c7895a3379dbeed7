"""Experiment loggers, one `logger=` option each: `wandb` (default), `tensorboard`, `mlflow`,
`csv` and `none`; several at once with `logger=[wandb,tensorboard]` (each option's config sits
under its own name in the `logger` node, so they compose side by side).

Each is a class of the same five methods, and nothing else: `log(metrics, step)` (per-step loss
and learning rate, per-epoch validation metrics), `summary(metrics)` (final test and validation
metrics), `log_predictions(...)` (the predictions and the confusion matrix image),
`log_model(path, metadata)` (the trained adapter or model) and `finish()`. Each gets the run's
config at its start, and its sweep group and name. `make_logger` makes a run's, and saves the
config beside it.
"""

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from emorec.errors import instantiate
from emorec.loggers.csv_logger import CSVLogger
from emorec.loggers.mlflow_logger import MLflowLogger
from emorec.loggers.tensorboard_logger import TensorBoardLogger
from emorec.loggers.wandb_logger import WandbLogger, has_wandb_credentials, run_id
from emorec.upgrade import versioned

__all__ = ["CSVLogger", "MLflowLogger", "NullLogger", "TensorBoardLogger", "WandbLogger", "make_logger"]
__all__ += ["has_wandb_credentials", "run_id"]


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

    def log_model(self, path: Path, metadata: dict) -> None:
        pass

    def finish(self) -> None:
        pass


class Loggers:
    """Several loggers as one: each call goes to each, in the order the config lists them."""

    def __init__(self, loggers: list):
        self.loggers = loggers

    def log(self, metrics: dict, step: int | None = None) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def summary(self, metrics: dict) -> None:
        for logger in self.loggers:
            logger.summary(metrics)

    def log_predictions(self, *args, **kwargs) -> None:
        for logger in self.loggers:
            logger.log_predictions(*args, **kwargs)

    def log_model(self, path: Path, metadata: dict) -> None:
        for logger in self.loggers:
            logger.log_model(path, metadata)

    def finish(self) -> None:
        for logger in self.loggers:
            logger.finish()


def make_logger(loggers: DictConfig, run_config: dict, out: Path, main: bool, resume: bool):
    """The run's loggers (the first process only; one of each option in `loggers`), and the
    resolved config saved beside them, with the version of the code that wrote it
    (emorec.upgrade). A resumed run's loggers continue the runs they logged to before."""
    if not main:
        return NullLogger()
    OmegaConf.save(OmegaConf.create(versioned(run_config)), out / "config.yaml")
    # Partials, so the run's config reaches each logger as a plain dict (instantiate would turn
    # keyword arguments into DictConfig nodes and instantiate the _target_s inside them).
    made = [
        instantiate(node, _partial_=True)(run_config=run_config, dir=str(out), resume=resume)
        for node in loggers.values()
    ]
    return made[0] if len(made) == 1 else Loggers(made)
