"""What happens around the training loop's steps (emorec.train): each a callback that sees
every step and epoch end, and may end training before an epoch (`done`). Loss logging, the
run's wall clock, a moving average of the weights, validation keeping the best weights (and
stopping early), checkpoints and stop signals."""

import logging
import math
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from emorec.checkpoint import Interrupted, load_checkpoint, restore_rng, save_checkpoint, torch_rng_state
from emorec.errors import EmorecError
from emorec.metrics import METRICS
from emorec.tensors import host_copy, local, trained_weights
from emorec.train import TrainingProgress, numerical_fault

log = logging.getLogger(__name__)


class Callback:
    def on_step(self, progress: TrainingProgress, epoch: float) -> None:
        pass

    def done(self, progress: TrainingProgress) -> bool:
        """Whether training should stop before the next epoch."""
        return False

    def on_epoch_end(self, progress: TrainingProgress) -> None:
        pass

    def close(self) -> None:
        pass


class LogLoss(Callback):
    """Every `every` steps and at the last: the mean batch loss since the last log, the learning
    rate and the epoch, to `log(metrics, step)` and the progress bar."""

    def __init__(self, log, scheduler, every: int, steps: int, start: int = 0, show: bool = True):
        self.log, self.scheduler, self.every, self.steps = log, scheduler, every, steps
        self.bar = tqdm(total=steps, initial=start, desc="train", disable=not show)

    def on_step(self, progress: TrainingProgress, epoch: float) -> None:
        self.bar.update()
        if progress.step % self.every == 0 or progress.step == self.steps:
            progress.settle()
            mean = sum(progress.running) / len(progress.running)
            progress.running = []
            self.bar.set_postfix(loss=f"{mean:.4f}")
            self.log(
                {"train/loss": mean, "train/lr": self.scheduler.get_last_lr()[0], "train/epoch": epoch}, progress.step
            )

    def close(self) -> None:
        self.bar.close()


class WallClock(Callback):
    """Stamps the progress with the run's wall time (`wall()`) at every step and epoch end, before
    the checkpointer saves it."""

    def __init__(self, wall: Callable[[], float]):
        self.wall = wall

    def on_step(self, progress: TrainingProgress, epoch: float) -> None:
        progress.wall_seconds = self.wall()

    def on_epoch_end(self, progress: TrainingProgress) -> None:
        progress.wall_seconds = self.wall()


class Average(Callback):
    """An exponential moving average of the trained weights (trainer.ema: its decay), updated
    after every optimizer step, in fp32 beside them. Validation and the run's result use it
    (`applied`, `install`) in place of the weights as they stand, which keep training. The decay
    at step t is min(ema, (t - 1) / t): until the window of 1 / (1 - ema) steps is full, the
    average is the plain mean of the weights after each step so far, so the start (an untrained
    adapter) never weighs in it."""

    def __init__(self, model, decay: float):
        self.decay = decay
        weights = trained_weights(model)
        self.names, self.params = list(weights), [local(p) for p in weights.values()]
        self.shadow = [p.detach().float().clone() for p in self.params]

    def on_step(self, progress: TrainingProgress, epoch: float) -> None:
        decay = min(self.decay, (progress.step - 1) / progress.step)
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - decay)

    @contextmanager
    def applied(self):
        """The average in the model's weights for the block, the weights as they were after it."""
        kept = [p.detach().clone() for p in self.params]
        self.install()
        try:
            yield
        finally:
            self.put(kept)

    def install(self) -> None:
        self.put(self.shadow)

    def put(self, values: list) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.params, values)

    def state_dict(self) -> dict:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.names):
            raise EmorecError("the checkpoint's weight average holds other weights; resume with the same adapter")
        self.shadow = [state[n].to(s.device, s.dtype) for n, s in zip(self.names, self.shadow)]


class KeepBest(Callback):
    """Validation at each epoch's end (`evaluate(desc)` returns (predictions, metrics)); the
    trainable weights of the best epoch by the metric of record stay in host memory (adapters are
    small; a fully fine-tuned model then takes no second copy on the GPU) and `restore` puts them
    back. With `patience`, training stops early (`done`). `view()`: what the weights validated and
    kept are (a context: the moving average, emorec.callbacks.Average; the weights by default)."""

    def __init__(self, model, evaluate, metric: str, log, patience: int | None = None):
        self.model, self.evaluate, self.metric, self.log = model, evaluate, metric, log
        self.value, self.epoch, self.state, self.val = -math.inf, None, None, None
        self.patience = patience
        self.view = nullcontext

    def done(self, progress: TrainingProgress) -> bool:
        """Early stopping: `patience` epochs have passed without a better validation metric.
        Read from the progress and the best epoch alone, so a resumed run stops where it would
        have."""
        return bool(self.patience) and self.epoch is not None and progress.epoch - self.epoch >= self.patience

    def on_epoch_end(self, progress: TrainingProgress) -> None:
        with self.view():
            self.validate(progress)

    def validate(self, progress: TrainingProgress) -> None:
        result, m = self.evaluate(f"val epoch {progress.epoch}")
        self.log({f"val/{k}": m[k] for k in METRICS if k in m}, progress.step)
        log.info(
            "epoch %d step %d: val %s %.4f, accuracy %.4f",
            progress.epoch,
            progress.step,
            self.metric,
            m[self.metric],
            m["accuracy"],
        )
        if m[self.metric] > self.value:
            # Under sharding (emorec.sharded) each process keeps its own shards.
            state = {n: host_copy(local(p)) for n, p in trained_weights(self.model).items()}
            self.value, self.epoch, self.state, self.val = m[self.metric], progress.epoch, state, (result, m)

    def restore(self) -> None:
        if self.state is not None:
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if n in self.state:
                        local(p).copy_(self.state[n])


@dataclass(frozen=True)
class Keep:
    """When checkpoints are written and how many stay: every `every` steps (0: only at epoch
    ends), the last `keep`; and at once when `stop()` names a signal."""

    every: int
    keep: int
    stop: Callable[[], str | None] = lambda: None


class Checkpointer(Callback):
    """Checkpoints as `when` says, at each epoch's end, and when a signal arrives, after which
    training raises Interrupted. All processes stop at the same step; `store` writes and reads
    the weights and optimizer state (WholeState, or emorec.sharded.ShardedState). `precision`
    (bf16 or fp32, what trainer.precision=auto chose on this machine) is saved with each
    checkpoint: a run resumed on a machine that chooses otherwise is told so. A weight average
    (`average`, trainer.ema) is saved and restored with the rest."""

    def __init__(self, out: Path, store, scheduler, best: KeepBest, backward, when: Keep, precision: str, average=None):
        self.out, self.store, self.scheduler, self.best = out, store, scheduler, best
        self.every, self.keep, self.stop, self.backward = when.every, when.keep, when.stop, backward
        self.precision, self.average = precision, average

    def on_step(self, progress: TrainingProgress, epoch: float) -> None:
        signal_name = self.stop()
        flag = torch.tensor([float(signal_name is not None)])  # on the host: agree moves it
        if self.backward.world > 1 and self.backward.agree(flag)[0]:
            signal_name = signal_name or "SIGTERM"  # a signal may reach the processes at different steps
        if signal_name or (self.every and progress.step % self.every == 0):
            path = self.save(progress)
            if signal_name:
                raise Interrupted(signal_name, progress.step, path)

    def on_epoch_end(self, progress: TrainingProgress) -> None:
        self.save(progress)

    def save(self, progress: TrainingProgress) -> Path | None:
        state = progress.state_dict()  # reads the pending losses: a non-finite one stops here
        # Never a checkpoint of broken weights; every process holds some (shards), all stop.
        finite = all(bool(torch.isfinite(local(p)).all()) for p in self.store.trainable().values())
        if self.backward.agree(torch.tensor([float(not finite)]))[0]:
            raise numerical_fault(f"weights are no longer finite after step {progress.step}")
        tensors = {"scheduler": self.scheduler.state_dict(), **torch_rng_state(), "generator": state.pop("generator")}
        if self.average is not None:
            tensors["average"] = self.average.state_dict()
        state = {"progress": state, "best_value": self.best.value, "best_epoch": self.best.epoch}
        state["precision"] = self.precision
        path = self.store.save(self.out, progress.step, self.best.state, tensors, state, self.keep)
        self.backward.barrier()
        return path

    def restore(self, path: Path) -> TrainingProgress:
        """Load a checkpoint into the model, optimizer, scheduler, best-so-far and RNGs."""
        saved = self.store.restore(path)
        self.scheduler.load_state_dict(saved["tensors"]["scheduler"])
        if self.average is not None:
            self.average.load_state_dict(saved["tensors"]["average"])
        state = saved["state"]
        if state.get("precision", self.precision) != self.precision:  # checkpoints before it lack it
            # trainer.precision=auto follows the hardware: a requeued job can land on another kind.
            log.warning(
                "resuming in %s a run whose checkpoint at step %d trained in %s: its steps mix the two "
                "(a run that may move between machines keeps one when launched with trainer.precision=bf16 or fp32)",
                self.precision,
                state["progress"]["step"],
                state["precision"],
            )
        # The best epoch's validation is recomputed from its weights at the end (deterministic).
        self.best.value, self.best.epoch, self.best.state = state["best_value"], state["best_epoch"], saved["best"]
        restore_rng(state, saved["tensors"])
        progress = TrainingProgress()
        progress.load_state_dict({**state["progress"], "generator": saved["tensors"]["generator"]})
        return progress


class WholeState:
    """The checkpointed weights and optimizer state where every process holds them whole (one
    process, data parallel): the first process writes them; each reads them back."""

    def __init__(self, model, optimizer, rank: int):
        self.model, self.optimizer, self.rank = model, optimizer, rank

    def trainable(self) -> dict:
        return trained_weights(self.model)

    def save(self, out: Path, step: int, best: dict | None, tensors: dict, state: dict, keep: int) -> Path | None:
        if self.rank != 0:
            return None
        tensors = {"optimizer": self.optimizer.state_dict(), **tensors}
        return save_checkpoint(out, step, weights=self.trainable(), best=best, tensors=tensors, state=state, keep=keep)

    def restore(self, path: Path) -> dict:
        saved = load_checkpoint(path)
        params = self.trainable()
        if saved["weights"] is None or set(params) != set(saved["weights"]):
            raise EmorecError(
                f"checkpoint {path} holds other weights than this run trains; resume with the same adapter"
                " and trainer.strategy"
            )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved["weights"][n])
        self.optimizer.load_state_dict(saved["tensors"]["optimizer"])
        return saved
