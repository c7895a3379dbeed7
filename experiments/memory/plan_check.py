"""emorec plan's estimates against measured memory (issue 42, item 4): short CPU training runs of
SmolLM2-135M's shape (random weights) on MELD, one process or two gloo processes, each
run's added resident memory (its first process's peak RSS minus its RSS before the model was
built) beside what `emorec plan` says for the same settings.

Every prompt is cut to trainer.max_length=64 tokens (MELD with 8 turns of context fills them),
one pass per batch of 8 rows, fp32: the estimate's worst case is the runs' case. glibc's mmap
threshold is fixed (MALLOC_MMAP_THRESHOLD_), so that freed memory leaves the RSS.

    EMOREC_DATA_DIR=../shared/datasets python -m experiments.memory.plan_check
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from emorec.plan import compose, plan

HERE = Path(__file__).parent
SETTINGS = [
    "model=random_smollm2_135m",
    "dataset=meld",
    "dataset.max_train=64",
    "dataset.max_eval=16",
    "dataset.context_window=8",
    "trainer.max_length=64",
    "trainer.batch_size=8",
    "trainer.max_pass_tokens=null",
    "trainer.max_steps=4",
    "trainer.precision=fp32",
    "trainer.checkpoint_every=0",
    "trainer.val_every_epoch=false",
]
RUNS = [
    ("full, data parallel, 1 process", 1, ["adapter=full"]),
    ("full, fsdp, 2 processes", 2, ["adapter=full", "trainer.strategy=fsdp"]),
    (
        "full, fsdp, 2 processes, activation checkpointing",
        2,
        ["adapter=full", "trainer.strategy=fsdp", "trainer.activation_checkpointing=true"],
    ),
    ("lora, data parallel, 1 process", 1, ["adapter=lora"]),
    ("lora, fsdp, 2 processes", 2, ["adapter=lora", "trainer.strategy=fsdp"]),
]


def measured(processes: int, overrides: list[str], run_dir: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time
    launcher = [sys.executable, "-m", "emorec"]
    if processes > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            "-m",
            "emorec",
        ]
    command = [*launcher, *SETTINGS, *overrides, "logger=none", f"hydra.run.dir={run_dir}"]
    # glibc raises its mmap threshold as large blocks are freed, and then keeps later freed ones
    # in its heap, which RSS counts as used: a fixed threshold returns them, so RSS is live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads((run_dir / "metrics.json").read_text())


def main() -> None:
    rows = []
    for name, processes, overrides in RUNS:
        metrics = measured(
            processes, overrides, Path("outputs/memory/plan_check") / name.replace(", ", "_").replace(" ", "-")
        )
        strategy = "fsdp" if "trainer.strategy=fsdp" in overrides else "data_parallel"
        _, *table = plan(compose([*SETTINGS, *overrides]), [processes], None, "cpu")
        (estimate,) = [r for r in table if r["strategy"] == strategy]
        rss = metrics["rss_mb"]
        # Loading holds a second copy for a moment (drawn, then sharded): the peak counted is
        # training's and evaluation's, over what the process held before the model.
        added = (rss["peak_after_model"] - rss["before_model"]) / 1024
        estimate = {k: round(v, 3) if isinstance(v, float) else v for k, v in estimate.items()}
        row = {"run": name, "estimate_gb": estimate, "measured_added_rss_gb": round(added, 3)}
        row["model_gb"] = round((rss["model"] - rss["before_model"]) / 1024, 3)
        row["measured_over_estimate"] = round(added / estimate["total"], 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    (HERE / "plan_check.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
