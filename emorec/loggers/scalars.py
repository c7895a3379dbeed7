"""What the TensorBoard, MLflow and CSV loggers share: numbers at the optimizer step, and the
one-line error for a logger whose package is not installed."""

import importlib

from emorec.errors import EmorecError


def require(module: str, option: str):
    """`module` imported, or a one-line error saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise EmorecError(
            f"logger={option} needs the {module.split('.')[0]} package; install it with: pip install 'emorec[loggers]'"
        ) from None


class ScalarLogger:
    """Each number of `log(metrics, step)` written at its step (`write`, per logger); the final
    `summary` at the last step, without the keys already logged as curves (the validation
    metrics of each epoch), so no curve gets a second point at its end."""

    step = 0

    def write(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.step = self.step if step is None else step
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        self.seen = getattr(self, "seen", set()) | set(values)
        if values:
            self.write(values, self.step)

    def summary(self, metrics: dict) -> None:
        self.log({k: v for k, v in metrics.items() if k not in getattr(self, "seen", set())})
