"""Activation memory measured, not guessed (issue 42, item 4): the bytes one training pass keeps
for its backward, per token, decoder layer and hidden unit, on emorec's own pass (the builder's
model and engine, a batch of real MELD prompts, autocast as a run sets it).

Measured with autograd's saved-tensor hooks: every tensor saved for the backward during the
loss's forward, each storage counted once, the model's own parameters left out. Two batches (8
and 16 training rows) give the bytes per token as the slope, which leaves out what a pass keeps
whatever its length (under autocast, the bf16 copies of fp32 weights that train). Checkpointed
layers keep what they save inside their own hooks, so activation checkpointing is not measured
here.

    EMOREC_DATA_DIR=../shared/datasets python -m experiments.memory.activations

`emorec.fast.TRAIN_BYTES` (34, from Korthikanti et al. 2022 for full training in bf16 with a
fused attention kernel) sizes a GPU's training passes today; results.json here is what the pass
keeps on this machine, per configuration.
"""

import json
import sys
from pathlib import Path

import torch

from emorec.build import Spec, build, prompts_of
from emorec.data.splits import load_splits
from emorec.env import Env
from emorec.tasks import Balance
from experiments.common import compose_config

HERE = Path(__file__).parent
ROWS = (8, 16)

# (name, overrides): the embedded model, and Qwen2.5-7B's layer shape with two layers (the bytes
# per layer and hidden unit do not depend on the number of layers).
CONFIGS = [
    ("smollm2_135m lora", ["model=smollm2_135m", "adapter=lora"]),
    ("smollm2_135m full", ["model=smollm2_135m", "adapter=full"]),
    ("smollm2_135m lora fast=off", ["model=smollm2_135m", "adapter=lora", "fast=off"]),
    ("qwen2.5-7b shape, 2 layers, lora", ["model=random_qwen2_5_7b", "model.architecture.num_hidden_layers=2"]),
]


def saved_bytes(model, loss_of) -> tuple[int, float]:
    """(bytes saved for the backward while `loss_of()` runs, the loss)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of()
    return sum(seen.values()), float(loss)


def measure(name: str, overrides: list[str], bf16: bool) -> dict:
    cfg = compose_config([*overrides, "dataset=meld", f"trainer.precision={'bf16' if bf16 else 'fp32'}"])
    data = load_splits(cfg.dataset, cfg.seed)
    env = Env(Path("outputs/memory"), cfg.seed, torch.device("cpu"), bf16)
    spec = Spec.of(cfg)
    built = build(spec, env, data.labels, Balance())
    model = built.model.train()
    points = []
    for n in ROWS:
        rows = data.train[:n]
        prompts = prompts_of(built.tokenizer, spec, rows, data.labels, 0)
        targets = [ex.label for ex in rows]

        def loss_of(prompts=prompts, targets=targets):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return built.task.loss(model, prompts, targets)

        saved, _ = saved_bytes(model, loss_of)
        points.append((sum(built.task.lengths(prompts, targets)), saved))
    (t0, b0), (t1, b1) = points
    config = getattr(model, "config", None) or model.get_base_model().config
    layers, hidden = config.num_hidden_layers, config.hidden_size
    per_token = (b1 - b0) / (t1 - t0)
    return {
        "config": name,
        "precision": "bf16" if bf16 else "fp32",
        "answers": built.engine.chosen["answers"],
        "tokens": [t0, t1],
        "saved_mb": [round(b0 / 2**20, 1), round(b1 / 2**20, 1)],
        "layers": layers,
        "hidden": hidden,
        "kb_per_token": round(per_token / 1024, 1),
        "bytes_per_token_layer_hidden": round(per_token / (layers * hidden), 1),
    }


def main() -> None:
    results = []
    chosen = [c for c in CONFIGS if not sys.argv[1:] or any(a in c[0] for a in sys.argv[1:])]
    for name, overrides in chosen:
        for bf16 in (False, True):
            row = measure(name, overrides, bf16)
            print(json.dumps(row), flush=True)
            results.append(row)
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
