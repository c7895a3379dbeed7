"""Checkpoints and stop signals: a killed or preempted run continues where it stopped.

A checkpoint is a folder `<run dir>/checkpoints/step-NNNNNNNN/` holding the trainable weights
(`adapter.safetensors`), the best weights so far (`best.safetensors`), the optimizer, scheduler
and RNG tensors (`trainer.pt`, read back with `torch.load(weights_only=True)`) and the loop's
position and counters (`state.json`). A sharded run (emorec.sharded) keeps its weights,
optimizer state and best weights in `shards/` instead, each process's in safetensors. It is
written through `outputs.atomic` (a temporary folder renamed into place), so a folder with a
checkpoint's name is always complete.
"""

import json
import pickle
import random
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from emorec.errors import EmorecError
from emorec.outputs import atomic

FOLDER = "checkpoints"
SHARDS = "shards"  # a sharded run's weights, optimizer state and best weights (emorec.sharded)
NAME = re.compile(r"step-(\d{8})$")


class Interrupted(EmorecError):
    """Training stopped on a signal after writing a checkpoint."""

    def __init__(self, signal_name: str, step: int, path: Path | None):
        self.signal_name, self.step, self.path = signal_name, step, path
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {path}")


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders do not match the name)."""
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if NAME.match(p.name) and p.is_dir())


PARTIAL = re.compile(r"(step-\d{8})\.(tmp|old)\d+$")  # outputs.atomic's temporaries


def tidy_checkpoints(run_dir: Path) -> None:
    """What a run killed while writing a checkpoint left (the run directory's lock is held, so
    nothing else is writing): a half-written `.tmp` folder goes; a complete checkpoint moved
    aside as `.old` (killed between atomic's two renames) takes its name back if nothing else
    has it, else goes."""
    folder = Path(run_dir) / FOLDER
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = PARTIAL.match(path.name)
        if match and match.group(2) == "old" and not (folder / match.group(1)).exists():
            path.rename(folder / match.group(1))
        elif match:
            shutil.rmtree(path, ignore_errors=True)


def find_checkpoint(resume, output_dir: Path) -> Path | None:
    """The checkpoint a run continues from. resume=true: the latest in output_dir, or None when
    there is none yet (a first start, or a requeued job preempted before its first checkpoint);
    resume=<path>: that checkpoint, or the latest in that run directory."""
    if resume is False or resume is None:
        return None
    if resume is True:
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(str(resume))
    if NAME.match(path.name) and (path / "state.json").is_file():
        return path
    found = checkpoints(path)
    if not found:
        raise EmorecError(f"resume={resume}: no checkpoint there; give a run directory with a {FOLDER}/ folder")
    return found[-1]


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    weights: dict[str, torch.Tensor] | None,
    best: dict[str, torch.Tensor] | None,
    tensors: dict,
    state: dict,
    keep: int,
    shards: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint atomically and keep the last `keep`. `tensors` (optimizer, scheduler,
    RNG) go through torch.save, `state` through JSON. A sharded run (emorec.sharded) passes no
    weights but `shards`, which writes every process's shards into the folder."""
    final = Path(run_dir) / FOLDER / f"step-{step:08d}"
    # The same step can be saved twice (a periodic checkpoint, then the epoch's end with its
    # validation): the newer one replaces it.
    with atomic(final) as tmp:
        tmp.mkdir(parents=True)
        if shards is not None:
            shards(tmp)
        if weights is not None:
            save_file({k: v.detach().contiguous() for k, v in weights.items()}, tmp / "adapter.safetensors")
        if best is not None:
            save_file({k: v.contiguous() for k, v in best.items()}, tmp / "best.safetensors")
        torch.save(tensors, tmp / "trainer.pt")
        state = {**state, "python_rng": random.getstate(), "numpy_rng": numpy_state()}
        (tmp / "state.json").write_text(json.dumps(state))
    for path in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict:
    """weights, best (or None), tensors and state of a checkpoint. Nothing here unpickles code:
    safetensors, JSON, and torch.load with weights_only=True."""
    try:
        state = json.loads((path / "state.json").read_text())
        # A sharded run's weights are in its shards (emorec.sharded reads them).
        sharded = (path / SHARDS).is_dir()
        weights = None if sharded else load_file(path / "adapter.safetensors")
        best = load_file(path / "best.safetensors") if (path / "best.safetensors").is_file() else None
        # On the host whatever device saved them: optimizer.load_state_dict moves each state to
        # its parameter's device, and a checkpoint from a GPU run then resumes anywhere.
        tensors = torch.load(path / "trainer.pt", weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:  # weights_only met something other than tensors and containers
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise EmorecError(
            f"checkpoint {path}: trainer.pt names {found.group(1) if found else 'more than tensors'} in its pickle, "
            "which could run code, so emorec refuses to load it; delete the checkpoint, or start afresh"
        ) from None
    except Exception as e:  # noqa: BLE001 - whatever a damaged file raises, the answer is the same
        raise EmorecError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "delete it to resume from the one before, or start afresh without resume"
        ) from None
    return {"weights": weights, "best": best, "tensors": tensors, "state": state}


def numpy_state() -> list:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), pos, has_gauss, gauss]


def torch_rng_state() -> dict:
    """torch's generators: the CPU's, and each CUDA device's where CUDA is in use."""
    state = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, tensors: dict) -> None:
    """Python's, numpy's and torch's generators as saved. CUDA generators are restored when the
    run has as many devices as the saved one (a resume on another machine draws afresh there)."""
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_rng"])
    cuda = tensors.get("cuda_rng")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


class StopSignals:
    """Inside: SIGTERM, SIGINT and SIGUSR2 (what SLURM and submitit send before preemption or a
    time limit) only set `received`; the training loop checkpoints at the end of its step and
    stops. A second signal stops at once, unless it is the first again within `REPEAT_S`: one
    request delivered twice (SLURM signals every process of a job step, and a parent process that
    hands it on, torchrun or a study's runner, delivers it once more). `forward()` then hands the
    signal to the handler that was there before (submitit's, which requeues the job)."""

    SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR2")
    REPEAT_S = 1.0

    def __init__(self):
        self.received: str | None = None
        self.at = 0.0
        self.previous: dict = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is None:
            self.received, self.at = name, time.monotonic()
        elif name != self.received or time.monotonic() - self.at > self.REPEAT_S:
            raise KeyboardInterrupt(f"second {name}")

    def __enter__(self):
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with whoever has them
                break
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def forward(self) -> None:
        """Call the earlier handler of the received signal, if it was a Python function."""
        if self.received is None:
            return
        handler = self.previous.get(getattr(signal, self.received))
        if callable(handler) and handler not in (signal.default_int_handler,):
            handler(getattr(signal, self.received), None)
