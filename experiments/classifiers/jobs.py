"""Issue 21's comparison on MELD: label scoring against the classification head, LoRA against
P-Tuning v2 (each initialisation), class balance and dialogue context. Each job is one emorec
run (seed 42, one epoch of the full training split, the whole test set); they run one after
another, each resumable, and each finished job's config and metrics (no predictions: they hold
MELD's text) are copied to runs/<job>/ at once, so a later session continues where this one
stopped.

    EMOREC_DATA_DIR=../shared/datasets python -m experiments.classifiers.jobs [--only JOB ...]
    python -m experiments.classifiers.jobs --list
"""

from pathlib import Path

from experiments.common import job_list

HERE = Path(__file__).parent
# name -> the run's overrides (every other setting is emorec's default).
JOBS = {
    "score-lora": [],
    "head_labels-lora": ["head=classifier"],
    "head_labels-ptv2_text": ["head=classifier", "adapter=ptuning_v2"],
    "head_labels-lora-headlr5e-3": ["head=classifier", "head.lr=5e-3"],
    "head_labels-lora-balance0.5": ["head=classifier", "trainer.balance=0.5"],
    "head_labels-lora-ctx3": ["head=classifier", "dataset.context_window=3"],
    "head_labels-lora-headlr2e-2": ["head=classifier", "head.lr=2e-2"],
    "head_labels-ptv2_text-adjust0.5": ["head=classifier", "adapter=ptuning_v2", "trainer.logit_adjust=0.5"],
    "score-ptv2_text": ["adapter=ptuning_v2"],
    # A second dataset: SST-2, 4,000 seeded training sentences (250 steps), the whole test set.
    "sst2-score-lora": ["dataset=sst2", "dataset.max_train=4000"],
    "sst2-head_labels-lora": ["dataset=sst2", "dataset.max_train=4000", "head=classifier"],
    "head_labels-lora-ctx1": ["head=classifier", "dataset.context_window=1"],
    "head_labels-lora-ctx6": ["head=classifier", "dataset.context_window=6"],
    "head_random-lora": ["head=classifier", "head.init=random"],
    "head_labels-ptv2_text-ctx1": ["head=classifier", "adapter=ptuning_v2", "dataset.context_window=1"],
    "head_labels-ptv2_text-ctx3": ["head=classifier", "adapter=ptuning_v2", "dataset.context_window=3"],
    "head_labels-lora-ctx3_before": ["head=classifier", "dataset.context_window=3", "prompt.context_layout=before"],
    "head_labels-lora-ctx12": ["head=classifier", "dataset.context_window=12"],
    "score-ptv2_random": ["adapter=ptuning_v2", "adapter.init=random", "optimizer.lr=5e-3"],
    "score-ptv2_zero": ["adapter=ptuning_v2", "adapter.init=zero"],
    "head_labels-ptv2_zero": ["head=classifier", "adapter=ptuning_v2", "adapter.init=zero"],
    "head_random-ptv2_text": ["head=classifier", "head.init=random", "adapter=ptuning_v2"],
    "head_labels-lora-balance1": ["head=classifier", "trainer.balance=1"],
    "score-lora-balance0.5": ["trainer.balance=0.5"],
}


def main() -> None:
    job_list(__doc__, JOBS, HERE / "runs", Path("outputs/classifiers"))


if __name__ == "__main__":
    main()
