"""A good start on a user's own data (issue 39): the `+experiment=own_data` preset, MiniLM's own
learning rate, the bag-of-words baseline on a run's own splits, and the dair-style corpus."""

import csv
import json
import os
import random
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from emorec.data.splits import load_splits
from experiments.common import read_results
from experiments.own_data import bow, dair, report
from experiments.own_data.jobs import DAIR, DAIR_FILE

CONF = str(Path(__file__).parent.parent / "conf")
# Invented sentences: each label has its own cue words among shared filler, so a bag of words
# can learn them and a wrong split or label mapping shows in its test accuracy.
CUES = {0: ["wonderful", "delighted", "smiling"], 1: ["furious", "slammed", "outraged"], 2: ["quiet", "still"]}
FILLER = "the a we today after my train morning friend house it was and then again".split()


def corpus(path: Path, per_label: int = 40) -> Path:
    """A dair-style file: `text,label` with integer ids, one file, no split column."""
    rng = random.Random(0)
    rows = []
    for label, cues in CUES.items():
        for _ in range(per_label):
            words = rng.sample(FILLER, 5) + [rng.choice(cues)]
            rng.shuffle(words)
            rows.append((" ".join(words), label))
    rng.shuffle(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    return path


def own(path: Path) -> list[str]:
    return ["dataset=csv", f"dataset.load.data_files={path}", "dataset.labels=[happy,angry,calm]"]


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_the_preset_trains_a_head_for_a_budget_of_examples():
    llm = compose_with("+experiment=own_data")
    assert llm.head.name == "classifier" and llm.head.init == "random" and llm.head.lr == 5e-3
    assert llm.trainer.max_steps * llm.trainer.batch_size == 10_000 and llm.optimizer.lr == 5e-4
    minilm = compose_with("+experiment=own_data", "model=minilm_l6", "adapter=full")
    assert minilm.head.name == "classifier" and minilm.optimizer.lr == 1e-4  # the model's full_lr
    # adapter=full elsewhere keeps its own rate, and a rate the user gives wins.
    assert compose_with("adapter=full").optimizer.lr == 5e-5
    assert compose_with("model=minilm_l6", "adapter=full", "adapter.lr=3e-4").optimizer.lr == 3e-4


def test_the_preset_runs_several_epochs_of_a_small_corpus(make_cfg, tmp_path):
    """A corpus smaller than the budget is seen several times (every epoch validated, the best
    kept); 8 steps of 4 over 24 training rows here."""
    from emorec.run import run

    data = corpus(tmp_path / "emotion.csv", per_label=12)
    overrides = [*own(data), "dataset.load.test_fraction=0.2", "dataset.load.dev_fraction=0.2"]
    metrics = run(make_cfg("+experiment=own_data", *overrides, "trainer.max_steps=8"))
    assert metrics["head"] == "classifier" and metrics["train"]["steps"] == 8
    n_train = sum(metrics["data"]["train_counts"].values())
    assert metrics["train"]["epochs"] == -(-8 * 4 // n_train) > 1
    assert 1 <= metrics["best_epoch"] <= metrics["train"]["epochs"]


def test_the_baseline_sees_the_runs_own_splits_and_learns_the_cues(make_cfg, tmp_path):
    from emorec.run import run

    data = corpus(tmp_path / "emotion.csv")
    overrides = [*own(data), "dataset.load.test_fraction=0.25"]
    out = tmp_path / "bow.json"
    bow.main([*overrides, "--out", str(out)])
    result = json.loads(out.read_text())
    metrics = run(make_cfg(*overrides, "trainer.max_steps=1"))
    assert result["train_n"] == sum(metrics["data"]["train_counts"].values())
    assert result["test"]["n"] == metrics["test"]["n"] and result["val"]["n"] == metrics["val"]["n"]
    assert result["metric"] == "macro_f1" and (result["C"], result["class_weight"]) in bow.GRID
    assert result["test"]["accuracy"] >= 0.9  # one cue word per sentence decides its label


def test_the_baseline_is_at_chance_on_shuffled_labels(tmp_path):
    """The same words with labels drawn at random: nothing to learn, so the cue test above can
    fail."""
    data = corpus(tmp_path / "emotion.csv")
    rows = list(csv.reader(data.open()))
    rng = random.Random(1)
    shuffled = [rows[0]] + [[text, str(rng.randrange(3))] for text, _ in rows[1:]]
    with open(data, "w", newline="") as f:
        csv.writer(f).writerows(shuffled)
    cfg = compose_with(*own(data), "dataset.load.test_fraction=0.25")
    result = bow.baseline(load_splits(cfg.dataset, cfg.seed), cfg.seed)
    assert result["test"]["accuracy"] < 0.7


@pytest.mark.skipif(not os.environ.get("EMOREC_DATA_DIR"), reason="DailyDialog needs EMOREC_DATA_DIR")
def test_the_dair_style_corpus_loads_with_the_readme_options(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOREC_DATA_DIR", os.environ["EMOREC_REAL_DATA_DIR"])
    out = tmp_path / "emotion.csv"
    dair.main(["--out", str(out), "--per-class", "30"])
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6 * 30 and {int(r["label"]) for r in rows} == set(range(6))
    overrides = [o.replace(str(DAIR_FILE), str(out)) for o in DAIR]  # the jobs' own options
    cfg = compose_with(*overrides)
    data = load_splits(cfg.dataset, cfg.seed)
    assert data.labels == dair.LABELS and len(data.train) + len(data.dev) + len(data.test) == 180
    assert min(len(data.dev), len(data.test)) > 0
    # The ids became the names by position: a row's label is its id's name.
    text_label = {r["text"]: dair.LABELS[int(r["label"])] for r in rows}
    assert all(text_label[ex.text] == data.labels[ex.label] for ex in data.test)


def test_the_report_puts_the_preset_beside_the_baseline(tmp_path):
    def job(folder: Path, name: str, value: float, **train):
        (folder / name).mkdir(parents=True)
        (folder / name / "config.yaml").write_text("seed: 42\n")
        metrics = {"metric": "macro_f1", "test": {"macro_f1": value}, "train": train or None}
        (folder / name / "metrics.json").write_text(json.dumps(metrics))

    runs, paper = tmp_path / "runs", tmp_path / "paper"
    job(runs, "sst5-preset", 0.50)
    job(paper, "sst5-lora_score", 0.47)
    job(runs, "sst5-score", 0.40)  # this folder's own run of a column wins over the study's
    bows = {"sst5": {"metric": "macro_f1", "train_n": 8544, "test": {"macro_f1": 0.4018}}}
    lines = {line[0]: line for line in report.rows(read_results(runs), read_results(paper), bows)}
    assert lines["sst5"][:5] == ["sst5", "macro_f1", "8544", "40.2", "40.0"] and lines["sst5"][-1] == "+9.8"
    assert lines["mastodon"][3:] == [""] * 7  # nothing run there yet
