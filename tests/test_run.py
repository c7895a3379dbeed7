"""run(cfg) end to end on the tiny model and the MELD-format fixture."""

import csv
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from emorec.batches import steps_per_epoch
from emorec.run import run
from tests.meld_fixture import predict_test_split
from tests.wandb_records import read_run


def read_predictions(out: Path) -> list[dict]:
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_lora_end_to_end(make_cfg, tiny_model):
    cfg = make_cfg("adapter=lora")
    metrics = run(cfg)
    out = Path(cfg.output_dir)

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test"]["weighted_f1"] == metrics["test"]["weighted_f1"]
    assert saved["dataset"] == "meld" and saved["metric"] == "weighted_f1" and saved["adapter"] == "lora"
    assert saved["val"]["n"] == 6 and saved["test"]["n"] == 8
    assert saved["train"]["steps"] == 2 * 4 and saved["train"]["tokens_per_s"] > 0
    assert 0 < saved["trainable_share"] < 0.5 and saved["peak_rss_mb"] > 0
    for key in ("accuracy", "macro_f1", "weighted_f1", "ua", "f1_per_class", "confusion_matrix"):
        assert key in saved["test"]
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    assert (out / "config.yaml").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    rows = read_predictions(out)
    assert len(rows) == 6 + 8 and {r["split"] for r in rows} == {"dev", "test"}
    test_rows = [r for r in rows if r["split"] == "test"]
    assert sum(r["gold"] == r["prediction"] for r in test_rows) / 8 == pytest.approx(metrics["test"]["accuracy"])
    score_cols = [c for c in rows[0] if c.startswith("score_")]
    assert len(score_cols) == 7 and all(abs(sum(float(r[c]) for c in score_cols) - 1) < 1e-4 for r in rows)

    # The saved adapter reloads with plain PEFT and predicts the same labels.
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, out / "adapter")
    labels = list(cfg.dataset.labels)
    preds = predict_test_split(model, AutoTokenizer.from_pretrained(tiny_model), cfg)["preds"]
    assert [labels[p] for p in preds] == [r["prediction"] for r in test_rows]


def test_training_is_reproducible_and_learns(make_cfg, tmp_path):
    first = run(make_cfg("trainer.epochs=3", f"output_dir={tmp_path / 'a'}"))
    second = run(make_cfg("trainer.epochs=3", f"output_dir={tmp_path / 'b'}"))
    assert first["train"]["losses"] == second["train"]["losses"]
    assert first["val"] == second["val"] and first["test"] == second["test"]
    losses = first["train"]["losses"]
    assert len(losses) == 12 and sum(losses[-4:]) < sum(losses[:4])  # it learns the fixture


def test_exact_losses_on_tiny_model(make_cfg):
    """Recipe regression (torchtune style): the first losses of a seeded fp32 run on the tiny
    model. A change to the loss, the batching or the seeding moves them."""
    losses = run(make_cfg("trainer.max_steps=3"))["train"]["losses"]
    assert losses == pytest.approx(EXPECTED_LOSSES, rel=1e-4)


EXPECTED_LOSSES = [11.985931396484375, 12.024911880493164, 11.913789749145508]


def test_zero_shot_none(make_cfg):
    cfg = make_cfg("adapter=none")
    metrics = run(cfg)
    out = Path(cfg.output_dir)
    assert metrics["train"] is None and metrics["trainable_params"] == 0
    assert not (out / "adapter").exists()
    assert len(read_predictions(out)) == 14


def test_generate_mode_counts_invalid(make_cfg):
    cfg = make_cfg("adapter=none", "trainer.predict=generate")
    metrics = run(cfg)
    rows = [r for r in read_predictions(Path(cfg.output_dir)) if r["split"] == "test"]
    invalid = sum(r["prediction"] == "INVALID" for r in rows)
    assert metrics["test"]["invalid"] == invalid
    assert all(r["generated"] is not None for r in rows)
    # Invalid answers count as wrong.
    assert metrics["test"]["accuracy"] <= (8 - invalid) / 8


def test_wandb_offline_run(make_cfg):
    cfg = make_cfg("logger=wandb", "logger.wandb.group=g1", "trainer.epochs=1")
    metrics = run(cfg)
    runs = list((Path(cfg.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = read_run(runs[0])
    assert logged["group"] == "g1"
    assert logged["config"]["adapter"]["name"] == "lora" and logged["config"]["adapter"]["r"] == 8
    assert logged["config"]["trainer"]["batch_size"] == 4
    summary = logged["summary"]
    assert summary["test/weighted_f1"] == pytest.approx(metrics["test"]["weighted_f1"])
    assert summary["val/accuracy"] == pytest.approx(metrics["val"]["accuracy"])
    assert summary["trainable_params"] == metrics["trainable_params"]
    keys = {k for row in logged["history"] for k in row}
    assert {"train/loss", "train/lr", "val/weighted_f1"} <= keys
    assert any(k.startswith("predictions/") for k in keys) and any(k.startswith("confusion_matrix") for k in keys)
    # The trained adapter, as an artifact of type model with the run's metrics.
    (artifact,) = [a for a in logged["artifacts"] if a["type"] == "model"]  # (tables are artifacts too)
    assert artifact["name"] == f"model-{logged['id']}"
    assert artifact["metadata"]["test/weighted_f1"] == pytest.approx(metrics["test"]["weighted_f1"])
    assert {"adapter_model.safetensors", "adapter_config.json", "base_model.json"} <= set(artifact["files"])
    assert (Path(cfg.output_dir) / "wandb_id").read_text().strip() == logged["id"]


def test_wandb_log_model_false_logs_no_artifact(make_cfg):
    cfg = make_cfg("logger=wandb", "logger.wandb.log_model=false", "trainer.max_steps=1")
    run(cfg)
    logged = read_run(next((Path(cfg.output_dir) / "wandb").glob("offline-run-*")))
    assert logged["summary"] and [a for a in logged["artifacts"] if a["type"] == "model"] == []


def test_steps_per_epoch_matches_batches():
    from emorec.batches import train_batches

    for n, bs, acc in [(30, 4, 1), (1000, 16, 1), (1000, 16, 3), (801, 16, 2)]:
        batches = train_batches(list(range(n)), bs, torch.Generator().manual_seed(0))
        assert steps_per_epoch(n, bs, acc) == len(batches) // acc


def test_the_reference_path_trains_and_predicts_as_the_fast_one(make_cfg, tmp_path):
    """fast=off runs the whole job on emorec.reference: in fp32 the same losses (up to rounding)
    and the same predictions as the default components, which the run names."""
    fast = run(make_cfg(f"output_dir={tmp_path / 'fast'}"))
    plain = run(make_cfg("fast=off", f"output_dir={tmp_path / 'plain'}"))
    assert fast["fast"]["answers"] == "packed pass" and fast["fast"]["train streams"] == 2
    assert plain["fast"] == {
        "answers": "reference",
        "merged adapter": False,
        "token batches": False,
        "eval streams": 1,
        "train streams": 1,
        "max pass tokens": 1024,
        "eval batch tokens": None,
        "static step": "off",
        "compile": "off",
        "fused kernels": "none",
        "backward": "one pass",
        "base dtype": "float32",
        "adapter input casts": True,
    }
    assert plain["train"]["losses"] == pytest.approx(fast["train"]["losses"], abs=1e-4)
    assert plain["train"]["computed_tokens"] == plain["train"]["tokens"] > fast["train"]["computed_tokens"]
    for split in ("val", "test"):
        assert plain[split]["confusion_matrix"] == fast[split]["confusion_matrix"]


def test_a_static_step_run_trains_as_the_packed_pass_and_records_its_buckets(make_cfg, tmp_path):
    """fast.static_shapes=true on a CPU (a GPU's default): in fp32 the losses (up to rounding)
    and predictions of the packed pass; metrics.json says what the static step ran."""
    packed = run(make_cfg("trainer.precision=fp32", "trainer.max_steps=4", f"output_dir={tmp_path / 'packed'}"))
    static = run(
        make_cfg(
            "trainer.precision=fp32", "trainer.max_steps=4", "fast.static_shapes=true", f"output_dir={tmp_path / 's'}"
        )
    )
    recorded = json.loads((tmp_path / "s" / "metrics.json").read_text())["fast"]
    assert packed["fast"]["static step"] == "off" and packed["fast"]["train streams"] == 2
    step = recorded["static step"]
    assert step["attention"] == "sdpa" and step["rows"] == 4 and 1 <= len(step["lengths"]) <= 8
    assert recorded["compile"] == "off" and recorded["train streams"] == 1
    assert static["train"]["losses"] == pytest.approx(packed["train"]["losses"], abs=1e-4)
    for split in ("val", "test"):
        assert static[split]["confusion_matrix"] == packed[split]["confusion_matrix"]


def test_a_compiled_run_trains_as_the_eager_static_step(make_cfg, tmp_path):
    """fast.compile=true on a CPU: inductor compiles the decoder layer once per bucket (two
    here); in fp32 the eager static step's losses and predictions."""
    common = ("trainer.precision=fp32", "trainer.max_steps=4", "fast.buckets=2", "fast.static_shapes=true")
    eager = run(make_cfg(*common, f"output_dir={tmp_path / 'eager'}"))
    compiled = run(make_cfg(*common, "fast.compile=true", f"output_dir={tmp_path / 'compiled'}"))
    assert compiled["fast"]["compile"] == "layer (default)" and eager["fast"]["compile"] == "off"
    assert len(compiled["fast"]["static step"]["lengths"]) == 2
    assert compiled["train"]["losses"] == pytest.approx(eager["train"]["losses"], abs=1e-4)
    for split in ("val", "test"):
        assert compiled[split]["confusion_matrix"] == eager[split]["confusion_matrix"]


def test_a_run_records_the_streams_it_used(make_cfg, tmp_path):
    """Dropout keeps training in one stream (threads would draw its masks in any order), and
    generation keeps evaluation in one: metrics.json says what ran, not what was asked for."""
    dropout = run(make_cfg("adapter.dropout=0.1", "trainer.max_steps=2", f"output_dir={tmp_path / 'dropout'}"))
    assert dropout["fast"]["train streams"] == 1 and dropout["fast"]["backward"] == "one pass"
    recorded = json.loads((tmp_path / "dropout" / "metrics.json").read_text())["fast"]
    assert recorded["train streams"] == 1 and recorded["eval streams"] == min(2, torch.get_num_threads())
    generate = run(make_cfg("adapter=none", "trainer.predict=generate", f"output_dir={tmp_path / 'generate'}"))
    assert generate["fast"]["eval streams"] == 1


def test_early_stopping_ends_training_after_patience_epochs_without_a_better_dev_metric(make_cfg, tmp_path):
    """With a learning rate too small to move the predictions, the dev metric never improves on
    epoch 1: patience 1 stops after epoch 2, of 5. A resumed run stops there too."""
    from emorec.callbacks import KeepBest
    from emorec.train import TrainingProgress

    cfg = make_cfg("trainer.epochs=5", "trainer.patience=1", "optimizer.lr=1e-12")
    metrics = run(cfg)
    assert metrics["train"]["epochs"] == 2 and metrics["best_epoch"] == 1
    full = run(make_cfg("trainer.epochs=5", "optimizer.lr=1e-12", f"output_dir={tmp_path / 'all'}"))
    assert full["train"]["epochs"] == 5 and full["train"]["steps"] == 5 * (metrics["train"]["steps"] // 2)
    assert metrics["train"]["steps"] % 2 == 0 and full["best_epoch"] == 1  # never better after epoch 1
    best = KeepBest(None, None, "macro_f1", None, patience=1)
    best.epoch = 1
    assert best.done(TrainingProgress(epoch=2)) and not best.done(TrainingProgress(epoch=1))
