"""Issue 39's question: what should a user start with on a corpus of their own? Each job is one
emorec run (seed 42), resumable; as each finishes its config and metrics (no predictions: they
hold the data's text) go to runs/<job>/, so a later session continues where this one stopped.
The bag-of-words baseline (bow.py) runs on the same splits; report.py puts them side by side.

    EMOREC_DATA_DIR=../shared/datasets python -m experiments.own_data.jobs [--only JOB ...]
    python -m experiments.own_data.jobs --list
    EMOREC_DATA_DIR=../shared/datasets python -m experiments.own_data.jobs --bow   # the baselines, bow/<dataset>.json

Datasets: the sentence-level sets here (SST-5, Mastodon, MOSI-2/3), a dair-style csv made from a
corpus nobody prepared for it (dair.py: `text,label` ids, one file, test and dev held out), and
the conversation sets (MELD, EmoryNLP, Friends), each without context. The one-epoch runs of the
paper's defaults on the standard sets are the paper study's (experiments/paper/runs/cpu_full).
"""

import argparse
import sys
from pathlib import Path

from experiments.common import Job, is_done, run_job
from experiments.own_data import bow
from experiments.own_data.dair import LABELS

HERE = Path(__file__).parent
DAIR_FILE = Path("outputs/own_data/dair/emotion.csv")
# What the README's "Your own data" section tells a user to write for such a file.
DAIR = [
    "dataset=csv",
    f"dataset.load.data_files={DAIR_FILE}",
    f"dataset.labels=[{','.join(LABELS)}]",
    "dataset.load.test_fraction=0.2",
]
DATASETS = {
    "dair": DAIR,
    "mastodon": ["dataset=mastodon"],
    "mosi2": ["dataset=mosi2"],
    "mosi3": ["dataset=mosi3"],
    "emorynlp": ["dataset=emorynlp"],
    "sst5": ["dataset=sst5"],
    "meld": ["dataset=meld"],
    "friends": ["dataset=friends"],
}
PRESET = ["+experiment=own_data"]
MINILM = ["model=minilm_l6", "adapter=full"]
# The defaults a user met before the preset (the paper's: label scoring, one epoch; MiniLM at
# full fine-tuning's general 5e-5, its default until this study), on the one corpus the paper
# study has not run.
BEFORE = {
    "dair-score": [*DAIR],
    "dair-head": [*DAIR, "head=classifier", "head.init=random"],
    "dair-minilm": [*DAIR, *MINILM, "adapter.lr=5e-5"],
}


def planned() -> dict[str, list[str]]:
    jobs = {f"{d}-preset": [*o, *PRESET] for d, o in DATASETS.items()}
    jobs.update({f"{d}-preset_minilm": [*o, *PRESET, *MINILM] for d, o in DATASETS.items()})
    jobs.update(BEFORE)
    return {name: [*overrides, "logger=none"] for name, overrides in jobs.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    jobs = planned()
    parser.add_argument("--only", nargs="*", choices=list(jobs), help="these jobs, in this order (default: all)")
    parser.add_argument("--outputs", type=Path, default=Path("outputs/own_data"), help="the runs' own folders")
    parser.add_argument("--list", action="store_true", help="print each job's state and stop")
    parser.add_argument("--bow", action="store_true", help="only the bag-of-words baselines missing from bow/")
    args = parser.parse_args(argv)
    if args.bow:
        for d, overrides in DATASETS.items():
            if not (HERE / "bow" / f"{d}.json").is_file():
                bow.main([*overrides, "--out", str(HERE / "bow" / f"{d}.json")])
        return
    failed = 0
    for name in args.only or jobs:
        done = is_done(HERE / "runs", name)
        if args.list:
            print(f"{name:28s} {'done' if done else 'to run'}  {' '.join(jobs[name])}")
        elif not done:
            try:
                run_job(Job(name, jobs[name]), args.outputs, HERE / "runs")
            except Exception as error:  # one failed job must not stop the others
                print(f"own_data: {name} failed ({error})", flush=True)
                failed += 1
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
