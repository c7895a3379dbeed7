"""One process against two data-parallel processes (torchrun, gloo) on this machine: the
default model, LoRA rank 8, MELD (480 training utterances, 300 dev, 300 test), the same global
batch (16) and seed, in bf16 (the default) and in fp32. Writes
experiments/distributed/results.json and prints the comparison.

    python -m experiments.distributed.compare [--train 480] [--eval 300]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
LAUNCHERS = {
    "one process": [sys.executable, "-m", "emorec"],
    "two processes (torchrun)": [
        sys.executable,
        *("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "emorec"),
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=480)
    parser.add_argument("--eval", type=int, default=300)
    args = parser.parse_args()
    settings = ["adapter=lora", "dataset=meld", "logger=none", "trainer.val_every_epoch=false"]
    settings += [f"dataset.max_train={args.train}", f"dataset.max_dev={args.eval}", f"dataset.max_eval={args.eval}"]
    result = {"args": vars(args)}
    for precision in ("bf16", "fp32"):
        result[precision] = compare([*settings, f"trainer.precision={precision}"])
    (HERE / "results.json").write_text(json.dumps(result, indent=2) + "\n")


def compare(settings: list[str]) -> dict:
    rows = {}
    for name, launcher in LAUNCHERS.items():
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            subprocess.run([*launcher, *settings, f"hydra.run.dir={tmp}"], check=True, capture_output=True)
            wall = time.perf_counter() - start
            m = json.loads((Path(tmp) / "metrics.json").read_text())
        rows[name] = {
            "wall_s": wall,
            "train_s": m["train"]["seconds"],
            "train_examples_per_s": m["train"]["examples_per_s"],
            "val_examples_per_s": m["val_examples_per_s"],
            "losses": m["train"]["losses"],
            **{f"{split}_{k}": m[split][k] for split in ("val", "test") for k in ("weighted_f1", "accuracy")},
        }
        print(settings[-1], name, {k: v for k, v in rows[name].items() if k != "losses"}, flush=True)
    one, two = rows.values()
    diff = max(abs(a - b) / abs(a) for a, b in zip(one["losses"], two["losses"]))
    print(f"largest relative difference between the runs' per-step losses: {diff:.2e}")
    return {"rows": rows, "max_relative_loss_difference": diff}


if __name__ == "__main__":
    main()
