"""Data parallel through accelerate: the same run under `torchrun --nproc_per_node N -m emorec`,
`accelerate launch -m emorec` or a multi-task SLURM job.

Every process holds the whole model and sees the same length-grouped batches; process r trains
on rows r, r+N, ... of each batch, and the gradients are averaged by the engine (DDP, or
DeepSpeed ZeRO-1/2 if `accelerate config` selects it; accelerate's engines that shard the model
are refused: emorec.sharded shards it, trainer.strategy=fsdp),
so the global batch is `trainer.batch_size` whatever N is.
Evaluation splits the examples the same way and gathers the predictions, so every process
computes the same metrics; only the main process writes outputs and logs to W&B.
"""

import os
import time
from contextlib import nullcontext

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, broadcast_object_list, gather_object

from emorec.errors import EmorecError
from emorec.train import OnePass, Passes


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def from_slurm() -> None:
    """Inside a submitit SLURM job of several tasks (a multi-GPU job of a sweep), set the
    variables torchrun would have set, from SLURM's own."""
    in_job = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
    if in_job and int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "RANK" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        # Each process picks its GPU by LOCAL_RANK (accelerate), so all stay visible.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def hydra_overrides(argv: list[str]) -> list[str]:
    """Overrides for this process's Hydra. Every process of a torchrun/accelerate launch starts
    the entrypoint, and Hydra would name a run directory from each one's clock: the first
    process's name goes to all. The others leave Hydra's own files (.hydra/, the log file) to it."""
    if world_size() == 1:
        return []
    if any(a in ("-m", "--multirun") for a in argv):
        raise EmorecError(
            "a sweep under torchrun/accelerate is not supported; give each sweep job several GPUs with "
            "+launcher=submitit_slurm hydra.launcher.gpus_per_node=N"
        )
    extra = []
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        # Joins the process group, which the run's Accelerator then reuses (with trainer.device
        # auto: on CPU, gloo).
        PartialState(cpu=not torch.cuda.is_available())
        stamp = broadcast_object_list([time.strftime("%Y-%m-%d/%H-%M-%S")])[0]
        extra.append(f"hydra.run.dir=outputs/{stamp}")
    if int(os.environ.get("RANK", "0")) > 0:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return extra


def rank_and_world(accelerator: Accelerator | None) -> tuple[int, int]:
    """This process's index and the number of processes (0, 1 without an engine)."""
    return (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def make_accelerator(device: torch.device) -> Accelerator | None:
    """The engine for a run of several processes (None for one). Its device replaces
    trainer.device: each process takes its own GPU."""
    if world_size() == 1:
        return None
    accelerator = Accelerator(cpu=device.type == "cpu")
    if accelerator.num_processes != world_size():
        raise EmorecError(
            f"WORLD_SIZE={world_size()} but accelerate started {accelerator.num_processes} process(es); "
            "launch with torchrun --nproc_per_node N -m emorec or accelerate launch --multi_gpu -m emorec"
        )
    check_whole_model(accelerator)
    return accelerator


def check_whole_model(accelerator) -> None:
    """Evaluation, checkpoints and the saved adapter read the model's own parameters, so an engine
    that shards them must be emorec's own (emorec.sharded, which gathers and checkpoints shards):
    accelerate's FSDP and DeepSpeed ZeRO-3 are refused; DDP and ZeRO-1/2 keep every weight whole."""
    kind = accelerator.distributed_type
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if kind == DistributedType.FSDP or (kind == DistributedType.DEEPSPEED and plugin and plugin.zero_stage == 3):
        raise EmorecError(
            f"accelerate is configured for {'FSDP' if kind == DistributedType.FSDP else 'DeepSpeed ZeRO-3'}, "
            "which shards the model behind emorec's back; for sharding use emorec's own, trainer.strategy=fsdp "
            "(FSDP2), launched with accelerate launch --multi_gpu or torchrun"
        )


def gather_predictions(result: dict, indices: list[int], n: int, accelerator: Accelerator | None) -> dict:
    """Every process's predictions for its share (`indices`) of n examples, in order, on every
    process. Throughput counts all n examples over the slowest process's time."""
    if accelerator is None:
        return result
    mine = list(zip(indices, result["preds"], result["extra"]))
    preds, extra = [0] * n, [None] * n
    for i, p, e in gather_object(mine):
        preds[i], extra[i] = p, e
    seconds = max(gather_object([result["seconds"]]))
    return {"preds": preds, "extra": extra, "seconds": seconds, "examples_per_s": n / seconds}


def end(accelerator: Accelerator | None) -> None:
    """Every process reaches here before any leaves (the main one may still be writing), then
    the process group closes (left open, gloo aborts the process at exit)."""
    if accelerator is not None and torch.distributed.is_initialized():
        accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()


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
