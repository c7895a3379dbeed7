"""The training loop, flat: batches, forward and backward, clip, step, callbacks.

How a step's backward is done is a strategy chosen once (`OnePass` here; `DataParallel` for
several processes; `fast.streams.Streamed` for thread streams); what else happens around the
steps (logging, validation with the best weights kept, checkpoints and stop signals) are
callbacks. The loop's resumable state is one `TrainingProgress`.
"""

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from emorec.batches import passes, train_batches
from emorec.checkpoint import Interrupted, load_checkpoint, restore_rng, save_checkpoint, torch_rng_state
from emorec.errors import EmorecError
from emorec.metrics import METRICS
from emorec.reference import host_copy

log = logging.getLogger(__name__)


@dataclass
class TrainingProgress:
    """Where training stands, and all it needs to continue: the epoch's batches come again from
    `generator` (the data order's generator state at the epoch's start), and `batch` is the
    first of them not yet trained on."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    generator: torch.Tensor | None = None
    examples: int = 0
    tokens: int = 0  # prompt and answer tokens of the examples trained on
    computed_tokens: int = 0  # tokens the model ran (a shared prefix once per pass)
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    running: list[float] = field(default_factory=list)  # batch losses since the last log
    seconds: float = 0.0  # training time, without validation
    # The run's wall time at this state, every earlier process's included (stamped by WallClock),
    # so a resumed run reports the time it took in all, not only its last process's.
    wall_seconds: float = 0.0
    # Steps not read yet: (step, batch losses, gradient norm), still on the device. Reading a
    # value from a GPU waits for all its queued work, so the loop reads once per log interval
    # (settle), not at every pass.
    pending: list = field(default_factory=list, repr=False)

    def state_dict(self) -> dict:
        self.settle()
        state = asdict(self)
        del state["pending"]
        return state

    def settle(self) -> None:
        """Read the pending steps' losses (one host sync for all), and stop at the first that is
        not finite: the weights after it are broken, the last checkpoint (never written from
        broken weights) holds those before it."""
        if not self.pending:
            return
        steps = [s for s, _, _ in self.pending]
        values = torch.stack([torch.cat([lo, norm.reshape(1).to(lo)]) for _, lo, norm in self.pending]).tolist()
        self.pending = []
        for step, row in zip(steps, values):
            *batch_losses, norm = row
            loss = sum(batch_losses) / len(batch_losses)
            if not math.isfinite(loss):
                raise numerical_fault(f"loss is {loss} at step {step}")
            if not math.isfinite(norm):
                raise numerical_fault(f"gradient norm is {norm} at step {step}")
            self.losses.append(loss)
            self.running += batch_losses

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def summary(self) -> dict:
        per_s = 1 / self.seconds if self.seconds else 0.0
        return {
            "steps": self.step,
            "epochs": self.epoch,
            "seconds": self.seconds,
            "examples": self.examples,
            "tokens": self.tokens,
            "computed_tokens": self.computed_tokens,
            "examples_per_s": self.examples * per_s,
            "tokens_per_s": self.tokens * per_s,
            "losses": self.losses,
        }


@dataclass(frozen=True)
class Plan:
    steps: int
    batch_size: int
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    seed: int = 0


@dataclass
class Passes:
    """How a batch's rows (indices into the training examples) become forward/backward passes.
    `loss_of(rows)`: the rows' mean loss; `lengths`: each example's tokens; `shared_length(rows)`:
    the tokens a pass of those rows runs once for all of them; `max_tokens`: see batches.passes."""

    loss_of: Callable[[list[int]], torch.Tensor]
    lengths: list[int]
    shared_length: Callable[[list[int]], int] = lambda rows: 0
    max_tokens: int | None = None

    def split(self, rows: list[int]) -> list[list[int]]:
        return passes(rows, max(self.lengths[j] for j in rows) - self.shared_length(rows), self.max_tokens)


class OnePass:
    """A step's batches as passes in this process, one after the other, gradients accumulated
    in .grad: the plain way."""

    rank, world = 0, 1

    def __init__(self, passes: Passes):
        self.passes = passes

    def step(self, batches: list[list[int]], progress: TrainingProgress) -> torch.Tensor:
        """Forward and backward of one optimizer step; each batch's mean loss, on the device
        (not read here: see TrainingProgress.pending)."""
        work = self.plan(batches, progress)
        group: list = [None] * len(batches)
        for k, (b, rows, share) in enumerate(work):
            # Each pass's mean loss, weighted by its share of the batch: the gradients add up to
            # those of the batch's mean loss (times N, as a data-parallel engine averages them).
            loss = self.backward(rows, share * self.world / len(batches), k == len(work) - 1) * share
            group[b] = loss if group[b] is None else group[b] + loss
        some = next(g for g in group if g is not None)  # a process has one pass per step at least
        return self.agree(torch.stack([torch.zeros_like(some) if g is None else g for g in group]))

    def backward(self, rows: list[int], scale: float, last: bool) -> torch.Tensor:
        loss = self.passes.loss_of(rows)
        (loss * scale).backward()
        return loss.detach().float()

    def plan(self, batches: list[list[int]], progress: TrainingProgress) -> list[tuple[int, list[int], float]]:
        """This process's passes of the step, as (batch in the group, rows, share of the batch);
        process r takes rows r, r+N, ... of each batch. Counts every process's tokens."""
        work = []
        for b, batch in enumerate(batches):
            for r in range(self.world):
                rows = batch[r :: self.world]
                for part in self.passes.split(rows) if rows else []:
                    if r == self.rank:
                        work.append((b, part, len(part) / len(batch)))
                    for piece in self.pieces(part):
                        tokens = sum(self.passes.lengths[j] for j in piece)
                        progress.tokens += tokens
                        progress.computed_tokens += tokens - (len(piece) - 1) * self.passes.shared_length(piece)
            progress.examples += len(batch)
        # Fewer rows than processes: a pass of weight 0 keeps this one in the gradient exchange.
        return work or [(0, batches[0][:1], 0.0)]

    def pieces(self, rows: list[int]) -> list[list[int]]:
        """The parts of a pass that run separately (for the count of tokens run)."""
        return [rows]

    def agree(self, values: torch.Tensor) -> torch.Tensor:
        """Sums over processes (each holds its rows' share of a loss, or a signal flag)."""
        return values

    def barrier(self) -> None:
        pass


class DataParallel(OnePass):
    """Several processes (DDP or DeepSpeed ZeRO-1/2 through accelerate): every process builds
    the same batches and trains on its stripe of rows; the engine averages the gradients, so an
    optimizer step sees the same global batch as with one process."""

    def __init__(self, passes: Passes, accelerator, model):
        super().__init__(passes)
        self.accelerator, self.model = accelerator, model
        self.rank, self.world = accelerator.process_index, accelerator.num_processes

    def backward(self, rows: list[int], scale: float, last: bool) -> torch.Tensor:
        # Gradients are exchanged once per step, on each process's last pass.
        with nullcontext() if last else self.accelerator.no_sync(self.model):
            loss = self.passes.loss_of(rows)
            self.accelerator.backward(loss * scale)
        return loss.detach().float()

    def agree(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(values.to(self.accelerator.device, torch.float64), "sum")

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


def numerical_fault(what: str) -> EmorecError:
    return EmorecError(
        f"{what}; lower optimizer.lr or use trainer.precision=fp32 (the last checkpoint holds the weights before it)"
    )


def check_finite(params, step: int) -> None:
    if not all(torch.isfinite(p).all() for p in params):
        raise numerical_fault(f"weights are no longer finite after step {step}")


def train(model, backward: OnePass, optimizer, scheduler, plan: Plan, callbacks=(), progress=None) -> TrainingProgress:
    """Train for `plan.steps` optimizer steps over epochs of length-grouped batches, continuing
    from `progress` when given. Callbacks see every step (`on_step(progress, epoch)`) and epoch
    end (`on_epoch_end(progress)`; their time there is not training time)."""
    p = progress or TrainingProgress()
    params = [q for q in model.parameters() if q.requires_grad]
    generator = torch.Generator().manual_seed(plan.seed)
    if p.generator is not None:
        generator.set_state(p.generator)
    clock = time.perf_counter()
    try:
        while p.step < plan.steps:
            model.train()
            p.generator = generator.get_state()
            batches = train_batches(backward.passes.lengths, plan.batch_size, generator)
            # Drop a last partial accumulation group, so every optimizer step sees the same batch.
            usable = len(batches) - len(batches) % plan.grad_accum
            for i in range(p.batch, usable, plan.grad_accum):
                losses = backward.step(batches[i : i + plan.grad_accum], p)
                # No host sync in a step: losses and the norm are read at the log interval.
                norm = (
                    torch.nn.utils.clip_grad_norm_(params, plan.max_grad_norm)
                    if plan.max_grad_norm
                    else torch.zeros((), device=losses.device)
                )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                p.step, p.batch = p.step + 1, i + plan.grad_accum
                p.pending.append((p.step, losses, norm.detach()))
                now = time.perf_counter()
                p.seconds, clock = p.seconds + now - clock, now
                for callback in callbacks:
                    callback.on_step(p, p.epoch + i / usable)
                if p.step >= plan.steps:
                    break
            p.settle()
            p.epoch, p.batch, p.generator = p.epoch + 1, 0, generator.get_state()
            p.seconds += time.perf_counter() - clock
            for callback in callbacks:
                callback.on_epoch_end(p)
            clock = time.perf_counter()
    finally:
        for callback in callbacks:
            callback.close()
    return p


class Callback:
    def on_step(self, progress: TrainingProgress, epoch: float) -> None:
        pass

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


class KeepBest(Callback):
    """Validation at each epoch's end (`evaluate(desc)` returns (predictions, metrics)); the
    trainable weights of the best epoch by the metric of record stay in host memory (adapters are
    small; a fully fine-tuned model then takes no second copy on the GPU) and `restore` puts them
    back."""

    def __init__(self, model, evaluate, metric: str, log):
        self.model, self.evaluate, self.metric, self.log = model, evaluate, metric, log
        self.value, self.epoch, self.state, self.val = -math.inf, None, None, None

    def on_epoch_end(self, progress: TrainingProgress) -> None:
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
            state = {n: host_copy(p) for n, p in self.model.named_parameters() if p.requires_grad}
            self.value, self.epoch, self.state, self.val = m[self.metric], progress.epoch, state, (result, m)

    def restore(self) -> None:
        if self.state is not None:
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if n in self.state:
                        p.copy_(self.state[n])


class Checkpointer(Callback):
    """Checkpoints every `every` steps (0: only at epoch ends), at each epoch's end, and when
    `stop()` names a signal, after which training raises Interrupted. All processes stop at the
    same step; the first writes."""

    def __init__(
        self, out: Path, model, optimizer, scheduler, best: KeepBest, *, every: int, keep: int, stop, backward
    ):
        self.out, self.model, self.optimizer, self.scheduler, self.best = out, model, optimizer, scheduler, best
        self.every, self.keep, self.stop, self.backward = every, keep, stop, backward

    def trainable(self) -> dict:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

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
        check_finite(self.trainable().values(), progress.step)  # never a checkpoint of broken weights
        tensors = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **torch_rng_state(),
            "generator": state.pop("generator"),
        }
        path = None
        if self.backward.rank == 0:  # every process holds the same state
            best = {"best_value": self.best.value, "best_epoch": self.best.epoch}
            path = save_checkpoint(
                self.out,
                progress.step,
                weights=self.trainable(),
                best=self.best.state,
                tensors=tensors,
                state={"progress": state, **best},
                keep=self.keep,
            )
        self.backward.barrier()
        return path

    def restore(self, path: Path) -> TrainingProgress:
        """Load a checkpoint into the model, optimizer, scheduler, best-so-far and RNGs."""
        saved = load_checkpoint(path)
        params = self.trainable()
        if set(params) != set(saved["weights"]):
            raise EmorecError(
                f"checkpoint {path} holds other weights than this run trains; resume with the same adapter"
            )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved["weights"][n])
        self.optimizer.load_state_dict(saved["tensors"]["optimizer"])
        self.scheduler.load_state_dict(saved["tensors"]["scheduler"])
        state = saved["state"]
        # The best epoch's validation is recomputed from its weights at the end (deterministic).
        self.best.value, self.best.epoch, self.best.state = state["best_value"], state["best_epoch"], saved["best"]
        restore_rng(state, saved["tensors"])
        progress = TrainingProgress()
        progress.load_state_dict({**state["progress"], "generator": saved["tensors"]["generator"]})
        return progress
