"""Issue 43's ablation on MELD and EmoryNLP: the current best configuration (P-Tuning v2 with the
classification head and logit adjustment 0.5, experiments/classifiers/), then dialogue context,
a speaker-aware prompt, their combination, and retrieved demonstrations on top (k = 2 and 4 by
similarity, one per label). Speaker identification and 2-3 epochs join as they are built. Each
job is one emorec run (seed 42, one epoch of the full training split, the whole test set),
resumable; each finished job's config and metrics (no predictions: they hold the datasets' text)
go to runs/<job>/ and are committed at once, so a later session continues where this one stopped.

    EMOREC_DATA_DIR=../shared/datasets python -m experiments.erc.jobs [--only JOB ...]
    python -m experiments.erc.jobs --list
"""

import argparse
from pathlib import Path

from experiments.common import Job, commit, is_done, run_job

HERE = Path(__file__).parent
BEST = ["head=classifier", "adapter=ptuning_v2", "trainer.logit_adjust=0.5"]
SPEAKER = "prompt.speaker_template='Classify the emotion {speaker} feels when saying the sentence to {labels}: {text}'"
STEPS = {"": [], "-ctx1": ["dataset.context_window=1"], "-speaker": [SPEAKER]}
STEPS["-ctx1-speaker"] = [*STEPS["-ctx1"], SPEAKER]
for k in (2, 4):
    STEPS[f"-ctx1-speaker-demo{k}"] = [*STEPS["-ctx1-speaker"], f"prompt.demonstrations={k}"]
STEPS["-ctx1-speaker-demo_label"] = [
    *STEPS["-ctx1-speaker"],
    "prompt.demonstrations=1",
    "prompt.demonstrations_by=label",
]
# name -> the run's overrides (every other setting is emorec's default).
JOBS = {
    f"{dataset}-best{step}": [f"dataset={dataset}", *BEST, *extra]
    for dataset in ("meld", "emorynlp")
    for step, extra in STEPS.items()
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=list(JOBS), help="these jobs, in this order (default: all)")
    parser.add_argument("--outputs", type=Path, default=Path("outputs/erc"), help="the runs' own folders")
    parser.add_argument("--list", action="store_true", help="print each job's state and stop")
    args = parser.parse_args()
    for name in args.only or JOBS:
        done = is_done(HERE / "runs", name)
        if args.list:
            print(f"{name:24s} {'done' if done else 'to run'}  {' '.join(JOBS[name])}")
        elif not done:
            run_job(Job(name, JOBS[name]), args.outputs, HERE / "runs")
            commit(HERE / "runs" / name, f"experiments/erc: job {name}")


if __name__ == "__main__":
    main()
