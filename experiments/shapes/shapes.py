"""Issue 38: how many distinct training step shapes one epoch runs, and how much of what it
computes is padding, per dataset, with the default config (SmolLM2's tokenizer, batch 16): the
packed pass (the shared prefix once per pass, each row padded to the pass's widest) and the
static step (static_shapes: the rows unpadded, the pass padded up to its bucket's length).

Counted from the batches and passes the engine builds (emorec.batches, the prefix rule of
emorec.fast.prefix.common_prefix), without running the model:
- gpu: one pass per batch (the GPU's token budget holds a batch of 16), shape (rows, prefix,
  width), and T = prefix + rows * width tokens in the packed sequence;
- cpu: passes of at most max_pass_tokens=1024 padded tokens, each cut into 2 thread streams.

    EMOREC_DATA_DIR=../shared/datasets python -m experiments.shapes.shapes [--datasets meld sst2 ...]
"""

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from emorec.batches import passes, token_batches, train_batches
from emorec.build import Spec, prompts_of
from emorec.data.splits import load_splits
from emorec.errors import instantiate
from emorec.fast.buckets import pass_tokens, plan_buckets
from emorec.fast.prefix import common_prefix
from emorec.fast.streams import pieces_of
from emorec.prompt import encode_answers
from emorec.schema import register

CONF = str(Path(__file__).resolve().parent.parent.parent / "conf")
DATASETS = ["meld", "emorynlp", "friends", "mastodon", "sst2", "sst5", "mosi2", "mosi3", "dailydialog"]


def piece_shape(prompts: list[list[int]], lengths: list[int], rows: list[int]) -> tuple[int, int, int]:
    """(rows, shared prefix, width) of a pass over `rows`: the prefix runs once, each row's
    remaining tokens (prompt and answer) are padded to the widest."""
    n = common_prefix([prompts[i] for i in rows])
    return len(rows), n, max(lengths[i] for i in rows) - n


def epoch_shapes(prompts: list[list[int]], lengths: list[int], seed: int, max_tokens=None, streams: int = 1) -> dict:
    """The distinct pass shapes of one epoch and the share of computed tokens that is padding."""
    shapes, computed, real = Counter(), 0, 0
    for batch in train_batches(lengths, 16, torch.Generator().manual_seed(seed)):
        rows, n, width = piece_shape(prompts, lengths, batch)
        for part in passes(batch, width, max_tokens):
            for piece in pieces_of(part, streams):
                shape = piece_shape(prompts, lengths, piece)
                shapes[shape] += 1
                computed += shape[1] + shape[0] * shape[2]
                real += shape[1] + sum(lengths[i] - shape[1] for i in piece)
    return {
        "passes": sum(shapes.values()),
        "distinct_shapes": len(shapes),
        "distinct_lengths": len({n + rows * width for rows, n, width in shapes}),
        "padding": 1 - real / computed,
    }


def static_shapes(prompts, lengths: list[int], slots: list[int], seed: int, most: int = 8, multiple: int = 8) -> dict:
    """The same for the static step (emorec.fast.static) on a GPU: one packed sequence per
    pass, the training set's common prefix, then the rows without padding between them, padded
    up to its bucket's length (emorec.fast.buckets, chosen from other epochs' passes than the
    one counted here); `slots`: each label's answer tokens."""
    n = common_prefix(prompts)
    buckets = plan_buckets(lengths, prompts[0][:n], slots, 16, (most, multiple, None))
    shapes, computed, real = Counter(), 0, 0
    for batch in train_batches(lengths, 16, torch.Generator().manual_seed(seed)):
        tokens = pass_tokens(lengths, n, batch)
        shapes[buckets.length(tokens)] += 1
        computed += buckets.length(tokens)
        real += tokens
    return {
        "passes": sum(shapes.values()),
        "distinct_shapes": len(shapes),
        "padding": 1 - real / computed,
        "prefix": n,
        "lengths": list(buckets.lengths),
    }


def evaluation_shapes(prompts: list[list[int]], budgets=(16384, 65536)) -> dict:
    """The batches (each its own shape) that evaluating these prompts runs on a GPU, per token
    budget (emorec.fast.token_budgets: 16,384 where the model's sizes are unknown; 65,536, the
    most, for a 7B model on a large GPU), batches.token_batches cutting them longest first."""
    lengths = [len(p) for p in prompts]
    return {str(b): len({(len(x), max(lengths[i] for i in x)) for x in token_batches(lengths, 16, b)}) for b in budgets}


def measure(dataset: str, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[f"dataset={dataset}", "logger=none", *overrides])
    data = load_splits(cfg.dataset, cfg.seed)
    spec = Spec.of(cfg)
    load = {"dtype": torch.bfloat16, "device": torch.device("cpu"), "attn_implementation": "eager"}
    _, tokenizer = instantiate(cfg.model.load, **load)  # the model's tokenizer (its weights unused)
    prompts = prompts_of(tokenizer, spec, data.train, data.labels, cfg.dataset.context_window)
    answers = encode_answers(tokenizer, cfg.prompt.template, cfg.prompt.system, data.labels)
    lengths = [len(p) + len(answers[ex.label]) for p, ex in zip(prompts, data.train)]
    return {
        "train": len(lengths),
        "gpu": epoch_shapes(prompts, lengths, cfg.seed),
        "static": static_shapes(prompts, lengths, [len(a) for a in answers], cfg.seed),
        "cpu": epoch_shapes(prompts, lengths, cfg.seed, max_tokens=1024, streams=2),
        "test": len(data.test),
        "evaluation_shapes": evaluation_shapes(
            prompts_of(tokenizer, spec, data.test, data.labels, cfg.dataset.context_window)
        ),
    }


def main() -> None:
    register()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=DATASETS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results.json")
    args = parser.parse_args()
    # DailyDialog as the paper study ran it: 10,000 of its 87k training utterances.
    extra = {"dailydialog": ["dataset.max_train=10000"]}
    results = {name: measure(name, extra.get(name, [])) for name in args.datasets}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    head = "| dataset | train | steps | GPU: distinct shapes | distinct T | padding "
    head += "| static: shapes | padding | lengths "
    print(head + "| CPU: passes | distinct shapes | padding |\n" + "|---" * 12 + "|")
    for name, r in results.items():
        g, s, c = r["gpu"], r["static"], r["cpu"]
        print(
            f"| {name} | {r['train']} | {g['passes']} | {g['distinct_shapes']} | {g['distinct_lengths']} | "
            f"{g['padding']:.1%} | {s['distinct_shapes']} | {s['padding']:.1%} | {s['lengths']} | "
            f"{c['passes']} | {c['distinct_shapes']} | {c['padding']:.1%} |"
        )
    print("\n| dataset | test | evaluation shapes at 16,384 tokens | at 65,536 |\n|---|---|---|---|")
    for name, r in results.items():
        e = r["evaluation_shapes"]
        print(f"| {name} | {r['test']} | {e['16384']} | {e['65536']} |")


if __name__ == "__main__":
    main()
