"""The paper's study (Peng et al., ICASSP 2024) as jobs that outlive a session (its table: report.py).

    EMOREC_DATA_DIR=../shared/datasets python -m experiments.paper.study run [--budget cpu_full] [--commit]
    python -m experiments.paper.study list                    # each job: done, to run, or waiting
    python -m experiments.paper.report --readme README.md     # the table, from runs/cpu_full

The grid, per dataset: zero-shot; P-Tuning v2 (prefix 32) and LoRA (rank 8), each with label
scoring and with the classifier head; the MiniLM baseline at three learning rates. Each family's
best configuration on the dev split (the dataset's metric of record, seed 42) then runs again
with seeds 43 and 44, and the best LLM configuration once more with dialogue context on the
conversation datasets. Jobs run one after another through `python -m emorec ... resume=true`;
each finished job's config and metrics go to runs/<budget>/<job>/ (experiments.common), and the report
is built from that folder alone.
"""

import argparse
import sys
from pathlib import Path

from experiments.common import Job, commit, is_done, read_results, run_job

HERE = Path(__file__).parent
# Smallest training split first, so whole rows of the table fill early.
DATASETS = ["mosi2", "mosi3", "mastodon", "sst2", "emorynlp", "sst5", "friends", "meld", "dailydialog"]
CONVERSATIONS = ["friends", "mastodon", "meld", "emorynlp", "dailydialog"]
SEEDS = [43, 44]
# The general LLM (the model's defaults: SmolLM2-135M-Instruct), zero-shot and adapted. Every
# other setting is emorec's default (LoRA r8 on q/k/v/o lr 5e-4; P-Tuning v2 32 tokens from the
# instruction's keys and values, lr 2e-2).
ZERO_SHOT = ["adapter=none"]
LLM = {
    "ptv2_score": ["adapter=ptuning_v2"],
    "ptv2_head": ["adapter=ptuning_v2", "head=classifier"],
    "lora_score": ["adapter=lora"],
    "lora_head": ["adapter=lora", "head=classifier"],
}
# SST-5's labels "very negative" and "very positive" share their first token, so the head cannot
# start from the label words there (head.init=labels refuses): it starts at random.
HEAD_INIT = {"sst5": ["head.init=random"]}
# The specialised baseline: all-MiniLM-L6-v2 fine-tuned whole, its learning rate chosen on dev.
MINILM = {f"minilm_lr{lr}": ["model=minilm_l6", "adapter=full", f"adapter.lr={lr}"] for lr in ("5e-5", "1e-4", "3e-4")}
# One previous turn after the instruction: issue 21's best context on MELD (more turns added
# nothing there, at 2.6-3.6x the training time).
CONTEXT = ["dataset.context_window=1"]


def best(results: dict, dataset: str, family) -> str | None:
    """The family's configuration with the highest dev value of the dataset's metric of record
    (its config's `metric`) at seed 42; None while any of them has not finished."""
    names = [f"{dataset}-{config}" for config in family]
    if not all(n in results for n in names):
        return None
    return max(names, key=lambda n: dev_score(results[n]["metrics"]))


def dev_score(metrics: dict) -> float:
    return metrics["val"][metrics["metric"]]


def jobs(results: dict, datasets=DATASETS, every=(), llm=()) -> tuple[list[Job], list[str]]:
    """Every job the results so far determine, in the order to run them (dataset by dataset, so
    whole rows of the table fill early), and a line for each family whose seeds wait (a family's
    best is known only when the whole family is done). `every`: overrides for every job (the
    budget); `llm`: for the general LLM's jobs only."""
    planned, waiting = [], []
    for d in datasets:
        families = {
            "LLM": {f"{d}-{c}": [f"dataset={d}", *o, *head_init(d, o), *llm] for c, o in LLM.items()},
            "MiniLM": {f"{d}-{c}": [f"dataset={d}", *o] for c, o in MINILM.items()},
        }
        planned.append(Job(f"{d}-zeroshot", [f"dataset={d}", *ZERO_SHOT, *llm]))
        planned += [Job(name, overrides) for family in families.values() for name, overrides in family.items()]
        for label, family in families.items():
            chosen = best(results, d, [name.removeprefix(f"{d}-") for name in family])
            if chosen is None:
                waiting.append(f"{d}: the best {label} configuration's seeds (and context) wait for its dev results")
                continue
            planned += [Job(f"{chosen}-s{s}", [*family[chosen], f"seed={s}"]) for s in SEEDS]
            if label == "LLM" and d in CONVERSATIONS:
                planned.append(Job(f"{chosen}-ctx1", [*family[chosen], *CONTEXT]))
    return [Job(j.name, [*j.overrides, *every, "sweep_name=paper"]) for j in planned], waiting


def head_init(dataset: str, overrides: list[str]) -> list[str]:
    return HEAD_INIT.get(dataset, []) if "head=classifier" in overrides else []


def budget_overrides(budget: str) -> list[str]:
    """`cpu_full` (or `+experiment=cpu_full`) -> the preset's override; `none` -> none."""
    name = budget.removeprefix("+experiment=")
    return [] if name in ("", "none") else [f"+experiment={name}"]


def run_study(results_dir: Path, outputs: Path, plan: dict, push: bool) -> int:
    """Run every job whose results are not there yet, re-reading the results after each (a
    finished family releases its seeds); a failed job is reported and skipped. `plan`: jobs()'s
    keyword arguments. The number of failed jobs."""
    failed: set[str] = set()
    while True:
        planned = jobs(read_results(results_dir), **plan)[0]
        todo = [j for j in planned if not is_done(results_dir, j.name) and j.name not in failed]
        if not todo:
            break
        job = todo[0]
        try:
            run_job(job, outputs, results_dir)
        except Exception as error:  # a failed job must not stop the others
            print(f"study: {job.name} failed ({error}); its run directory {outputs / job.name} is kept", flush=True)
            failed.add(job.name)
            continue
        if push:
            commit(results_dir / job.name, f"paper study: {job.name} ({results_dir.name})")
    for line in jobs(read_results(results_dir), **plan)[1]:
        print(f"study: still waiting: {line}")
    return len(failed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "list"])
    parser.add_argument("overrides", nargs="*", help="key=value for the general LLM's jobs (model=..., needs --name)")
    parser.add_argument(
        "--every", action="append", default=[], metavar="KEY=VALUE", help="for every job (needs --name)"
    )
    parser.add_argument("--budget", default="cpu_full", help="an experiment preset (cpu_full, cpu_budget) or none")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=DATASETS, help="these datasets only")
    parser.add_argument("--name", help="the results folder under --runs (default: the budget's name)")
    parser.add_argument("--runs", type=Path, default=HERE / "runs", help="where results folders go")
    parser.add_argument("--outputs", type=Path, default=Path("outputs/paper"), help="the runs' own folders")
    parser.add_argument("--commit", action="store_true", help="git-commit each finished job's results")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    if (args.overrides or args.every) and not args.name:
        parser.error("overrides change the jobs: give the study its own --name, so its results stay apart")
    name = args.name or args.budget.removeprefix("+experiment=") or "none"
    results_dir = args.runs / name
    plan = dict(datasets=args.datasets, every=[*budget_overrides(args.budget), *args.every], llm=args.overrides)
    if args.command == "run":
        sys.exit(1 if run_study(results_dir, args.outputs / name, plan, args.commit) else 0)
    found = read_results(results_dir)
    planned, waiting = jobs(found, **plan)
    for job in planned:
        print(f"{job.name:34s} {'done' if job.name in found else 'to run'}  {' '.join(job.overrides)}")
    for line in waiting:
        print(f"waiting: {line}")


if __name__ == "__main__":
    main()
