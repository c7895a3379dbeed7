"""`emorec plan [overrides] [--processes 1,2,4,8] [--tokens T] [--device cuda|cpu]`: the memory
one process of a run needs, before anything is launched, for data parallel and for FSDP over
each number of processes, so a user can choose a strategy and a GPU count.

Nothing here is a rule of thumb. The model is built from its config on PyTorch's meta device
(shapes without memory: a 70 B model in a second), with the run's adapter, and then:
- weights, gradients: the parameters as the run stores them (a frozen base in bf16 under bf16,
  what trains in fp32: emorec.fast.plan_load), counted;
- optimizer state: the run's optimizer (conf/optimizer) stepped once on a small tensor, its
  state's bytes per weight counted, times the weights that train;
- the weight average (trainer.ema): an fp32 copy of what trains;
- activations: one training pass of the process's rows at T tokens each run on the meta model
  under autograd's saved-tensor hooks, every tensor kept for the backward counted once (each
  storage once, the weights left out); with activation checkpointing, each layer's input
  instead, plus one layer's activations during its recomputation;
- FSDP's gathered weights: the root's (embeddings, head, kept whole through the forward) and two
  layers' (the one computing and the one prefetched), in the dtype they gather in;
- a sharded checkpoint: torch's safetensors writer builds each process's file in host memory,
  twice its shard of the trained weights and optimizer state for a moment (host memory: in the
  total on a CPU, printed beside it for a GPU).
What allocators and kernels add (workspace, fragmentation, CUDA context: about 0.5-1 GB on a
GPU) is not in it: experiments/memory/ compares the estimates with measured peaks.
"""

import argparse
import math
import sys
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from emorec.errors import EmorecError, instantiate

GB = 2**30


@dataclass(frozen=True)
class Shapes:
    """A model's parameters by role, in elements, and the bytes one pass keeps."""

    frozen: int
    trained: int
    root: int  # in no decoder layer (embeddings, final norm, head): gathered whole under FSDP
    layer: int  # the largest decoder layer
    layers: int
    pass_bytes: int  # activations of the pass measured
    layer_input_bytes: int  # one layer's input for that pass (what checkpointing keeps)


def model_config(model: DictConfig):
    """The transformers config of a model config: its `architecture`, or its folder's config.json
    (hub names need the hub or its cache)."""
    from transformers import AutoConfig

    if "architecture" in model:
        spec = OmegaConf.to_container(model.architecture, resolve=True)
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    load = model.load
    if str(load._target_).endswith("load_gguf_from_package"):
        from emorec.model import converted_gguf

        return AutoConfig.from_pretrained(converted_gguf(load.package, load.gguf_file, load.install))
    source = OmegaConf.select(model, "load.name_or_path")
    if not isinstance(source, str):
        raise EmorecError(f"emorec plan cannot tell model {model.name}'s shape; give model.name_or_path a folder")
    try:
        return AutoConfig.from_pretrained(source, revision=model.get("revision"))
    except OSError as e:
        raise EmorecError(
            f"emorec plan reads model {model.name}'s config.json and cannot ({str(e).splitlines()[0]}); "
            "give model.name_or_path a local folder or a hub name within reach"
        ) from None


def meta_model(cfg: DictConfig, dtype: torch.dtype, attention: str = "sdpa"):
    """The run's model (base, adapter) on the meta device, all in the compute dtype, with a GPU's
    attention (SDPA) unless told otherwise."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from emorec.adapters import prepare
    from emorec.settings import is_encoder

    config = model_config(cfg.model)
    encoder = is_encoder(cfg.model)
    with torch.device("meta"):
        if encoder:
            model = AutoModelForSequenceClassification.from_config(
                config, dtype=dtype, num_labels=len(cfg.dataset.labels)
            )
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
        full = cfg.adapter.train and cfg.adapter.peft is None
        model.requires_grad_(bool(full))
        if cfg.adapter.peft is not None:
            model = get_peft_model(model, prepare(instantiate(cfg.adapter.peft), cfg.adapter.get("init"), False))
    return model


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # a storage's identity, on the meta device too


def saved_bytes(model, rows: int, tokens: int) -> tuple[int, int]:
    """(bytes autograd keeps for the backward of one pass over `rows` x `tokens`, one layer's
    input), the decoder body run on the meta device (the LM head runs at the answer positions
    only in emorec: a few per row, left out)."""
    from emorec.tensors import base_of

    body = base_of(model).base_model
    weights = {storage(p) for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if storage(t) not in weights:
            kept[storage(t)] = t.untyped_storage().nbytes()
        return t

    model.train()  # dropout keeps its masks
    ids = torch.zeros(rows, tokens, dtype=torch.long, device=next(model.parameters()).device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = body(input_ids=ids).last_hidden_state
    return sum(kept.values()), hidden.numel() * hidden.element_size()


def shapes_of(model, rows: int, tokens: int) -> Shapes:
    from emorec.sharded import decoder_layers

    layers = decoder_layers(model)
    if not any(p.requires_grad for p in model.parameters()):
        activations, layer_input = 0, 0  # nothing trains: no backward
    else:
        activations, layer_input = saved_bytes(model, rows, tokens)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    return Shapes(
        frozen=sum(p.numel() for p in model.parameters() if not p.requires_grad),
        trained=sum(p.numel() for p in model.parameters() if p.requires_grad),
        root=sum(p.numel() for p in model.parameters() if id(p) not in in_layers),
        layer=max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0),
        layers=len(layers),
        pass_bytes=activations,
        layer_input_bytes=layer_input,
    )


def optimizer_bytes_per_weight(make_optimizer) -> float:
    """The optimizer's state per trained weight, counted after one step on a small tensor."""
    p = torch.nn.Parameter(torch.zeros(1024))
    optimizer = make_optimizer([p])
    p.grad = torch.zeros_like(p)
    optimizer.step()
    state = optimizer.state[p].values()
    return sum(t.numel() * t.element_size() for t in state if isinstance(t, torch.Tensor) and t.numel() > 1) / 1024


def footprint(shapes: Shapes, settings: dict, processes: int, strategy: str) -> dict:
    """Per-process GB of each part, for `strategy` over `processes`."""
    base, compute, checkpointing = settings["base_bytes"], settings["compute_bytes"], settings["checkpointing"]
    n = processes if strategy == "fsdp" else 1
    parts = {
        "weights": (shapes.frozen * base + shapes.trained * 4) / n,
        "gradients": shapes.trained * 4 / n,
        "optimizer": shapes.trained * settings["optimizer_bytes"] / n,
        "average": shapes.trained * 4 * settings["average"],  # trainer.ema's fp32 copy (never sharded)
    }
    # The pass's rows are this process's share of a batch: activations scale with them.
    share = math.ceil(settings["batch_size"] / processes) / settings["rows"]
    if checkpointing:  # each layer's input, and one layer's activations while it recomputes
        per_layer = shapes.pass_bytes / max(shapes.layers, 1)
        parts["activations"] = share * (shapes.layer_input_bytes * shapes.layers + per_layer)
    else:
        parts["activations"] = share * shapes.pass_bytes
    parts["gathered"] = (shapes.root + 2 * shapes.layer) * compute if strategy == "fsdp" and n > 1 else 0
    # A sharded checkpoint's safetensors files are built in host memory (torch's DCP writer):
    # twice the process's shard of what trains, for a moment (measured: experiments/memory/).
    trained_state = shapes.trained * (4 + settings["optimizer_bytes"]) / n
    parts["checkpoint"] = 2 * trained_state if strategy == "fsdp" else 0
    parts = {k: v / GB for k, v in parts.items()}
    training = sum(v for k, v in parts.items() if k != "checkpoint")
    # A checkpoint is written between steps (gradients and activations freed): on a CPU, where its
    # host memory is the run's, the peak is the larger moment; on a GPU it is training's.
    writing = parts["weights"] + parts["optimizer"] + parts["average"] + parts["checkpoint"]
    parts["total"] = max(training, writing) if settings["on_cpu"] else training
    return parts


def plan(cfg: DictConfig, processes: list[int], tokens: int | None, device: str) -> list[dict]:
    """One row per strategy and number of processes."""
    from emorec.fast import Fast, plan_load
    from emorec.settings import is_encoder

    bf16 = cfg.trainer.precision == "bf16" or (cfg.trainer.precision == "auto" and device == "cuda")
    trains_base = bool(cfg.adapter.train and cfg.adapter.peft is None) or is_encoder(cfg.model)
    load = plan_load(Fast(**cfg.fast), torch.device("cpu"), bf16, trains_base)
    compute = torch.bfloat16 if bf16 else torch.float32
    rows, per_row = min(cfg.trainer.batch_size, 4), tokens or cfg.trainer.max_length
    shapes = shapes_of(meta_model(cfg, compute), rows, per_row)
    settings = {
        "base_bytes": torch.empty((), dtype=load.dtype).element_size(),
        "compute_bytes": torch.empty((), dtype=compute).element_size(),
        "optimizer_bytes": optimizer_bytes_per_weight(instantiate(cfg.optimizer)) if cfg.adapter.train else 0,
        "checkpointing": bool(cfg.trainer.activation_checkpointing),
        "average": bool(cfg.adapter.train and cfg.trainer.get("ema")),
        "on_cpu": device == "cpu",
        "batch_size": cfg.trainer.batch_size,
        "rows": rows,
    }
    table = []
    for strategy in ("data_parallel", "fsdp"):
        for n in processes:
            parts = footprint(shapes, settings, n, strategy)
            table.append({"strategy": strategy, "processes": n, **parts})
    meta = {"trained": shapes.trained, "frozen": shapes.frozen, "tokens_per_row": per_row, "bf16": bf16}
    return [meta, *table]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="emorec plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="the run's overrides, as for python -m emorec")
    parser.add_argument("--processes", default="1,2,4,8", help="numbers of processes (GPUs) to plan for")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per row (default: trainer.max_length)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where the run will train")
    args = parser.parse_args(argv)
    try:
        processes = [int(n) for n in args.processes.split(",")]
        meta, *rows = plan(compose(args.overrides), processes, args.tokens, args.device)
    except (EmorecError, ValueError) as e:
        raise SystemExit(f"emorec: error: {e}") from None
    print(
        f"{meta['trained']:,} weights train, {meta['frozen']:,} frozen; {'bf16' if meta['bf16'] else 'fp32'} compute; "
        f"activations at {meta['tokens_per_row']} tokens per row; GB per process:"
    )
    keys = ["strategy", "processes", "weights", "gradients", "optimizer", "average", "activations", "gathered", "total"]
    keys.insert(-1 if args.device == "cpu" else len(keys), "checkpoint")  # host memory, beside a GPU's
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from emorec.__main__ import CONF
    from emorec.schema import register

    register()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return hydra_compose("config", overrides=["logger=none", *overrides])


if __name__ == "__main__":
    main(sys.argv[1:])
