"""The training loop, flat: batches, forward and backward, clip, step, callbacks.

How a step's backward is done is a strategy chosen once by emorec.fast (`OnePass` here;
`distributed.DataParallel` for several processes; `fast.streams.Streamed` for thread streams);
what else happens around the steps (logging, validation with the best weights kept,
checkpoints and stop signals) are callbacks (emorec.callbacks). The loop's resumable state is one `TrainingProgress`.
"""

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from emorec.batches import passes, train_batches
from emorec.errors import EmorecError

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
    the tokens a pass of those rows runs once for all of them; `max_tokens`: see batches.passes;
    `kind(row)`: rows of different kinds (an auxiliary task's, emorec.auxiliary) never share a pass."""

    loss_of: Callable[[list[int]], torch.Tensor]
    lengths: list[int]
    shared_length: Callable[[list[int]], int] = lambda rows: 0
    max_tokens: int | None = None
    kind: Callable[[int], int] = lambda row: 0

    def split(self, rows: list[int]) -> list[list[int]]:
        parts = []
        for k in sorted({self.kind(j) for j in rows}):
            same = [j for j in rows if self.kind(j) == k]
            parts += passes(same, max(self.lengths[j] for j in same) - self.shared_length(same), self.max_tokens)
        return parts


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
        work, self.counts = [], [0] * self.world  # every process's passes
        for b, batch in enumerate(batches):
            for r in range(self.world):
                rows = batch[r :: self.world]
                for part in self.passes.split(rows) if rows else []:
                    self.counts[r] += 1
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

    def clip(self, params: list, max_norm: float) -> torch.Tensor:
        """Scale the gradients to a total norm of at most max_norm; the norm before."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def agree(self, values: torch.Tensor) -> torch.Tensor:
        """Sums over processes (each holds its rows' share of a loss, or a signal flag)."""
        return values

    def barrier(self) -> None:
        pass


def numerical_fault(what: str) -> EmorecError:
    return EmorecError(
        f"{what}; lower optimizer.lr or use trainer.precision=fp32 (the last checkpoint holds the weights before it)"
    )


def train(model, backward: OnePass, optimizer, scheduler, plan: Plan, callbacks=(), progress=None) -> TrainingProgress:
    """Train for `plan.steps` optimizer steps over epochs of length-grouped batches, continuing
    from `progress` when given. Callbacks see every step (`on_step(progress, epoch)`) and epoch
    end (`on_epoch_end(progress)`; their time there is not training time), and may end training
    before an epoch (`done(progress)`: early stopping)."""
    p = progress or TrainingProgress()
    params = [q for q in model.parameters() if q.requires_grad]
    generator = torch.Generator().manual_seed(plan.seed)
    if p.generator is not None:
        generator.set_state(p.generator)
    clock = time.perf_counter()
    try:
        while p.step < plan.steps and not any(callback.done(p) for callback in callbacks):
            model.train()
            p.generator = generator.get_state()
            batches = train_batches(backward.passes.lengths, plan.batch_size, generator)
            # Drop a last partial accumulation group, so every optimizer step sees the same batch.
            usable = len(batches) - len(batches) % plan.grad_accum
            for i in range(p.batch, usable, plan.grad_accum):
                losses = backward.step(batches[i : i + plan.grad_accum], p)
                # No host sync in a step: losses and the norm are read at the log interval.
                norm = (
                    backward.clip(params, plan.max_grad_norm)
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
