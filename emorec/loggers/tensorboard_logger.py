"""logger=tensorboard: event files under the run directory (`tensorboard --logdir outputs`)."""

from pathlib import Path

import yaml

from emorec.loggers.scalars import ScalarLogger, require


class TensorBoardLogger(ScalarLogger):
    """A TensorBoard run in `<run dir>/tensorboard`: scalars at the optimizer step, the config,
    the sweep group and name as text, the confusion matrix as an image. A resumed run writes
    to the same folder, its steps going on from the checkpoint's."""

    def __init__(self, run_config: dict, dir: str, resume: bool = False, group=None, name=None):
        require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(dir) / "tensorboard"))
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(run_config, sort_keys=False) + "```")
        if group or name:
            self.writer.add_text("run", f"group: {group}\n\nname: {name}")

    def write(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps what it logged

    def log_predictions(self, columns, rows, labels, golds, preds, image: str | None) -> None:
        if image:
            from matplotlib.image import imread

            self.writer.add_image("confusion_matrix", imread(image)[..., :3], self.step, dataformats="HWC")

    def log_model(self, path: Path, metadata: dict) -> None:
        self.writer.add_text("model", f"saved in {path}")

    def finish(self) -> None:
        self.writer.close()
