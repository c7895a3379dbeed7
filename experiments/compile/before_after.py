"""emorec's CPU default before and after a change, on one machine in one sitting: the bench's
default job (`make bench`'s last row: LoRA on MELD's first 480 training examples, 300 dev and
test) run from two source trees, alternating, `--repeats` times each; medians of training and
evaluation examples/s, and the validation metric and last loss (which must agree).

    git worktree add /tmp/before <commit>
    EMOREC_DATA_DIR=../shared/datasets python -m experiments.compile.before_after --before /tmp/before --out ba.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from experiments.bench.bench import emorec_overrides

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def one_run(tree: Path, n_train: int, n_eval: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "emorec", *emorec_overrides(extra, n_train, n_eval), f"hydra.run.dir={tmp}"]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        subprocess.run(args, check=True, capture_output=True, text=True, cwd=tree, env=env)
        m = json.loads((Path(tmp) / "metrics.json").read_text())
    return {
        "train_examples_per_s": m["train"]["examples_per_s"],
        "eval_examples_per_s": m["test_examples_per_s"],
        "val_weighted_f1": m["val"]["weighted_f1"],
        "last_loss": m["train"]["losses"][-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the source tree before the change")
    parser.add_argument("--after", type=Path, default=REPO)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train", type=int, default=480)
    parser.add_argument("--eval", type=int, default=300)
    parser.add_argument("--out", type=Path, default=HERE / "before_after.json")
    parser.add_argument("overrides", nargs="*", help="config overrides for both")
    args = parser.parse_args()
    runs = {"before": [], "after": []}
    for k in range(args.repeats):
        for name in ("before", "after"):
            runs[name].append(one_run(getattr(args, name), args.train, args.eval, args.overrides))
            print(name, k + 1, runs[name][-1], flush=True)
            args.out.write_text(json.dumps(runs, indent=2) + "\n")
    for name, rows in runs.items():
        medians = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        print(name, "median:", {k: round(v, 4) for k, v in medians.items()})


if __name__ == "__main__":
    main()
