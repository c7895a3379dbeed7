"""Issue 38 on this CPU: the training step as the CPU runs it by default (the packed pass, two
thread streams), the static step eager (SDPA over a mask made once per pass) and the static step
compiled (torch.compile, inductor), on the embedded SmolLM2-135M with the default LoRA, bf16,
MELD's training batches of 16. Per variant: the first step (cold: a compile, for the compiled
step) and the mean of `--steps` warm steps, all of one bucket, forward, backward and AdamW; and
the kernel-launching ops per decoder layer of a step (experiments/compile/ops.py).

    EMOREC_DATA_DIR=../shared/datasets python -m experiments.compile.compile_cpu --out results.json
"""

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from emorec.batches import passes, train_batches
from emorec.build import Spec, build, prompts_of
from emorec.data.splits import load_splits
from emorec.env import Env, seed_everything
from emorec.fast import Fast
from emorec.fast.buckets import pass_tokens, plan_buckets
from emorec.fast.prefix import common_prefix
from emorec.schema import register
from emorec.tasks import Balance
from emorec.train import Passes, TrainingProgress
from experiments.compile.ops import per_layer

CONF = str(Path(__file__).resolve().parent.parent.parent / "conf")
VARIANTS = {
    "packed pass, 2 streams (CPU default)": {},
    "packed pass, 1 stream": {"train_streams": 1},
    "static step, eager": {"static_shapes": "true"},
    "static step, compiled per layer": {"compile": "true"},
    "static step, compiled whole": {"compile": "true", "compile_scope": "step"},
}


def setup(fast: dict, seed: int):
    """(built, training prompts, targets) for MELD with the default config and `fast` changes."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["dataset=meld", "logger=none"])
    seed_everything(seed)
    data = load_splits(cfg.dataset, seed)
    spec = Spec.of(cfg)
    spec = Spec(spec.model, spec.adapter, spec.head, spec.prompt, spec.trainer, Fast(**{**cfg.fast, **fast}))
    env = Env(Path("."), seed, torch.device("cpu"), True)
    built = build(spec, env, data.labels, Balance())
    prompts = prompts_of(built.tokenizer, spec, data.train, data.labels, cfg.dataset.context_window)
    return built, prompts, [ex.label for ex in data.train]


def one_bucket(prompts, targets, task, count: int, max_tokens: int) -> list[list[int]]:
    """`count` + 1 full batches that all run at the static step's most common length as one
    pass (of at most `max_tokens` padded tokens: the same batches for every variant)."""
    lengths = task.lengths(prompts, targets)
    n = common_prefix(prompts)
    slots = [len(task.answers[t]) for t in set(targets)]
    buckets = plan_buckets(lengths, prompts[0][:n], slots, 16, (Fast.buckets, Fast.bucket_multiple, max_tokens))
    batches = [b for b in train_batches(lengths, 16, torch.Generator().manual_seed(0)) if len(b) == 16]
    batches = [b for b in batches if len(passes(b, max(lengths[j] for j in b) - n, max_tokens)) == 1]
    bucket = [buckets.length(pass_tokens(lengths, n, b)) for b in batches]
    common = Counter(bucket).most_common(1)[0][0]
    return [b for b, t in zip(batches, bucket) if t == common][: count + 1]


def measure(name: str, fast: dict, steps: int, seed: int) -> dict:
    built, prompts, targets = setup(fast, seed)
    model = built.model.train()
    task = built.engine.for_training(built.task, model, prompts, targets, 16)

    def loss_of(rows):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return task.loss(model, [prompts[j] for j in rows], [targets[j] for j in rows])

    lengths = task.lengths(prompts, targets)
    passes = Passes(loss_of, lengths, lambda rows: task.shared_length(model, [prompts[j] for j in rows]), 1024)
    backward = built.engine.backward(model, passes)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = one_bucket(prompts, targets, built.task, steps, built.engine.max_pass_tokens)
    times = []
    for batch in batches:
        start = time.perf_counter()
        backward.step([batch], TrainingProgress())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)

    def one_pass():  # in this thread (a dispatch mode does not see the streams' threads)
        model.zero_grad(set_to_none=True)
        loss_of(batches[0]).backward()

    ops = per_layer(model, one_pass) if "compiled" not in name else Counter()
    warm = sum(times[1:]) / len(times[1:])
    return {
        "chosen": {
            k: v
            for k, v in built.engine.chosen.items()
            if k in ("answers", "train streams", "static step", "compile", "backward")
        },
        "cold_s": times[0],
        "warm_s_per_step": warm,
        "examples_per_s": 16 / warm,
        "ops_per_layer": sum(ops.values()) or None,
    }


def main() -> None:
    register()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--keep", action="store_true", help="keep the other variants' results in --out")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results.json")
    args = parser.parse_args()
    # Cold means cold: inductor's on-disk cache of compiled graphs starts empty.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="emorec-inductor-")
    results = json.loads(args.out.read_text()) if args.keep and args.out.is_file() else {}
    results.update(threads=torch.get_num_threads(), torch=torch.__version__)
    for name in args.variants:
        results[name] = measure(name, VARIANTS[name], args.steps, args.seed)
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # after each variant
        print(name, json.dumps(results[name]), flush=True)


if __name__ == "__main__":
    main()
