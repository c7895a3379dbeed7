"""Sharded training (trainer.strategy=fsdp): PyTorch's FSDP2 splits every decoder layer's
weights, gradients and optimizer state over the processes, so a model whose training state does
not fit one GPU (AdamW on a fully fine-tuned 7 B model: about 112 GB) trains on several. The same
run with one process works too (a process group of one), as the plain path on a CPU.

What changes against data parallel (emorec.distributed), and why:
- the model: `fully_shard` on each decoder layer, then on the root (the PEFT wrapper, if any),
  with bf16 gathers and fp32 gradient reduction on a GPU that computes bf16. A prompt-learning
  adapter's prompt encoder stays whole in every process (PEFT reads it outside any forward to
  save it); its gradients are averaged here (`Sharded.step`);
- a step: each forward gathers every layer's shards from all processes and each backward
  scatters its gradients, so every process runs as many passes (`Sharded.plan` fills in passes
  of weight 0); evaluation likewise runs as many forwards everywhere (`equal_forwards`);
- checkpoints: a distributed checkpoint in safetensors, each process writing its own shards
  (`ShardedState`); it loads on another number of processes too, re-sliced;
- the saved adapter or model: gathered to the first process (`gathered_state`), the same files
  as an unsharded run's, so `emorec predict` and `emorec export` take it in one process.
"""

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from emorec.checkpoint import SHARDS, load_checkpoint, save_checkpoint
from emorec.errors import EmorecError
from emorec.tensors import base_of, is_quantized, local, trained_weights
from emorec.train import OnePass, Passes

log = logging.getLogger(__name__)


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


def join_group(device: torch.device) -> None:
    """The process group FSDP shards over: torchrun's (which accelerate joined already with
    several processes), or, alone, a group of this process only."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def leave_group() -> None:
    """Close the group a process of its own made (several processes: distributed.end closes it)."""
    if dist.is_initialized() and dist.get_world_size() == 1:
        dist.destroy_process_group()


def decoder_layers(model) -> list[torch.nn.Module]:
    """The modules that shard one by one: those of the classes transformers names as never to be
    split across devices (`_no_split_modules`: the decoder or encoder layers), innermost first."""
    classes = set(getattr(base_of(model), "_no_split_modules", None) or ())
    return [m for m in reversed(list(model.modules())) if type(m).__name__ in classes]


def prompt_encoders(model) -> list[torch.nn.Module]:
    return list(getattr(model, "prompt_encoder", {}).values())


def shard(model, device: torch.device, bf16: bool, name: str):
    """The model sharded in place over the process group (joined here if needed)."""
    if is_quantized(model):
        raise EmorecError(
            f"trainer.strategy=fsdp cannot shard model {name}'s 4/8-bit weights here (bitsandbytes); "
            "use trainer.strategy=data_parallel for QLoRA, or model.quantization=null"
        )
    layers = decoder_layers(model)
    if not layers:
        raise EmorecError(
            f"model {name} names no layer class to shard by (transformers' _no_split_modules); "
            "use trainer.strategy=data_parallel"
        )
    join_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))  # fully_shard moves each shard onto it
    # On a GPU that computes bf16, shards are gathered in bf16 and gradients reduced in fp32 (the
    # sums exact to fp32); elsewhere the weights gather as stored and autocast computes as usual.
    on_gpu = bf16 and device.type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if on_gpu else None
    options = {"mesh": mesh, **({"mp_policy": policy} if policy else {})}
    for layer in layers:
        fully_shard(layer, **options)
    for encoder in prompt_encoders(model):  # kept whole, on the device
        encoder.to(device)
    kept = {p for encoder in prompt_encoders(model) for p in encoder.parameters()}
    fully_shard(model, ignored_params=kept or None, **options)
    return model


class Sharded(OnePass):
    """A step's passes under FSDP: this process's rows of each batch, as with data parallel, and
    passes of weight 0 where another process runs more (each forward and backward is a
    collective over all). FSDP averages the sharded gradients; the whole ones are averaged here."""

    def __init__(self, passes: Passes, model):
        super().__init__(passes)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = local(next(model.parameters())).device
        self.whole = [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]

    def plan(self, batches: list[list[int]], progress) -> list[tuple[int, list[int], float]]:
        work = super().plan(batches, progress)
        return work + [(0, batches[0][:1], 0.0)] * (max(1, *self.counts) - len(work))

    def step(self, batches: list[list[int]], progress) -> torch.Tensor:
        losses = super().step(batches, progress)
        for p in self.whole:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world
        return losses

    def clip(self, params: list, max_norm: float) -> torch.Tensor:
        """Gradients clipped to a total norm over all shards (and the whole weights) at once."""
        groups = [[p for p in params if isinstance(p, DTensor) == sharded] for sharded in (True, False)]
        grads = [[p.grad for p in group if p.grad is not None] for group in groups]
        norms = [get_total_norm(g) for g in grads if g]
        total = torch.linalg.vector_norm(torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]))
        with implicit_replication():  # the norm, a plain tensor, scales the shards alike
            for group in groups:
                clip_grads_with_norm_(group, max_norm, total)
        return total

    def agree(self, values: torch.Tensor) -> torch.Tensor:
        values = values.to(self.device, torch.float64)
        dist.all_reduce(values)
        return values

    def barrier(self) -> None:
        dist.barrier()


@contextmanager
def equal_forwards(model, pad_id: int):
    """Inside: the model's forwards are counted; on leaving, this process runs one-token forwards
    until it has run as many as the process that ran the most (each forward gathers every layer's
    shards from all processes, and a process with fewer examples or shorter batches runs fewer)."""
    count = [0]
    handle = model.register_forward_pre_hook(lambda module, args: count.__setitem__(0, count[0] + 1))
    try:
        yield
    finally:
        handle.remove()
    device = local(next(model.parameters())).device
    most = torch.tensor([count[0]], device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    ids = torch.tensor([[pad_id]], device=device)
    with torch.no_grad():
        for _ in range(int(most) - count[0]):
            model(input_ids=ids, attention_mask=torch.ones_like(ids))


def gathered_state(model) -> dict[str, torch.Tensor]:
    """The trainable weights, whole, in the first process's host memory (the others get {}):
    what an unsharded run saves. Every process must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)
    # A tied weight (the LM head of SmolLM2, Llama 3.2) comes once, as the unsharded model saves it.
    tied = set(dict(model.named_parameters(remove_duplicate=False))) - set(dict(model.named_parameters()))
    return {k: v for k, v in state.items() if k not in tied}


class ShardedState:
    """A sharded run's checkpoint: the trainable weights, the optimizer's state and the best
    epoch's weights as a distributed checkpoint in safetensors (each process its own shards, no
    pickle), beside emorec's state.json and trainer.pt (scheduler, RNG) from the first process."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self.rank = dist.get_rank()

    def trainable(self) -> dict:
        return trained_weights(self.model)

    def tensors(self, best: dict | None) -> dict[str, torch.Tensor]:
        """Every tensor of the checkpoint by a flat name: the weights and the optimizer's state as
        this process holds them (shards, or whole), the best weights as shards of the same layout."""
        weights = self.trainable()
        flat = {f"model/{n}": p for n, p in weights.items()}
        for n, p in weights.items():
            state = self.optimizer.state.get(p, {})
            flat.update({f"optimizer/{n}/{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
        for n, p in weights.items() if best is not None else ():
            flat[f"best/{n}"] = (
                DTensor.from_local(
                    best[n], p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False
                )
                if isinstance(p, DTensor)
                else best[n]
            )
        return flat

    def save(self, out: Path, step: int, best: dict | None, tensors: dict, state: dict, keep: int) -> Path | None:
        flat = self.tensors(best)

        def shards(folder: Path | None) -> None:
            # The first process names the (temporary) folder; all write their shards there.
            target = [str(folder / SHARDS) if folder else None]
            dist.broadcast_object_list(target, src=0)
            dcp_save(flat, storage_writer=HuggingFaceStorageWriter(target[0], save_distributed=True))

        if self.rank != 0:
            shards(None)
            return None
        # The optimizer's settings as they stand (the scheduler's learning rate is one of them).
        groups = [{k: v for k, v in g.items() if k != "params" and is_plain(v)} for g in self.optimizer.param_groups]
        state = {**state, "processes": dist.get_world_size(), "param_groups": groups}
        return save_checkpoint(
            out, step, weights=None, best=None, tensors=tensors, state=state, keep=keep, shards=shards
        )

    def restore(self, path: Path) -> dict:
        saved = load_checkpoint(path)
        if not (path / SHARDS).is_dir():
            raise EmorecError(
                f"checkpoint {path} is not sharded; resume it with trainer.strategy=data_parallel, as it ran"
            )
        if (saved_by := saved["state"].get("processes")) != dist.get_world_size():
            log.info(
                "checkpoint %s was written by %s processes; its shards are re-sliced for %d",
                path,
                saved_by,
                dist.get_world_size(),
            )
        make_states(self.optimizer)  # to load into
        has_best = saved["state"].get("best_epoch") is not None
        best = {n: torch.empty_like(local(p), device="cpu") for n, p in self.trainable().items()} if has_best else None
        flat = self.tensors(best)  # loaded in place: the weights, the optimizer's states, the best
        try:
            dcp_load(flat, storage_reader=HuggingFaceStorageReader(str(path / SHARDS)))
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - a missing or damaged shard: the same answer
            raise EmorecError(
                f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "delete it to resume from the one before, or start afresh without resume"
            ) from None
        for group, settings in zip(self.optimizer.param_groups, saved["state"]["param_groups"]):
            group.update({k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
        saved["best"] = {n: local(flat[f"best/{n}"]) for n in best} if best is not None else None
        return saved


def make_states(optimizer) -> None:
    """A new optimizer's per-weight states (Adam's moments, made at its first step), made by one
    step of zero gradients at learning rate 0, which leaves the weights as they are."""
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate


def is_plain(value) -> bool:
    """Whether an optimizer setting is a number, flag, name or tuple of numbers (JSON keeps it)."""
    if isinstance(value, tuple | list):
        return all(is_plain(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)
