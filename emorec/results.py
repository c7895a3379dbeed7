"""What a finished run writes: a description of what ran, the trained weights (safetensors),
the predictions and the confusion matrix (`export`), and metrics.json with the logger's summary
(`write_metrics`). The files themselves are written whole or not at all (emorec.outputs)."""

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig
from peft import PeftModel

from emorec.build import Built
from emorec.data.splits import Data
from emorec.env import Env, hardware, peak_gpu_mb, peak_rss_mb
from emorec.metrics import METRICS
from emorec.model import BASE_FILE
from emorec.outputs import atomic, plot_confusion, prediction_columns, prediction_rows, write_json, write_predictions
from emorec.tensors import base_of, recomputes_activations


def describe(built: Built, env: Env, data: Data) -> dict:
    """What ran: the task, precision, parameter counts and the speed components."""
    model = built.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {
        "dataset": data.name,
        "metric": data.metric,
        **built.task.describe(),
        "precision": env.precision,
        "hardware": hardware(env.device, env.rank_world[1]),
        "trainable_params": trainable,
        "total_params": total,
        "embedding_params": base_of(model).get_input_embeddings().weight.numel(),
        "trainable_share": trainable / total,
        "activation_checkpointing": recomputes_activations(model),
        "fast": built.engine.chosen,
        "data": data.stats,
    }


def export(out: Path, built: Built, data: Data, results: tuple, logger, adapter: DictConfig, state=None) -> Path | None:
    """The trained adapter (or, trained without one, the whole model) as safetensors, the
    predictions and the test confusion matrix (`results`: validation's and test's); the
    predictions also to the logger. `state`: a sharded run's trained weights, gathered
    (emorec.sharded.gathered_state). Returns the folder the weights went to (None when nothing
    trained)."""
    model, saved, (val, test) = built.model, None, results
    weights = {} if state is None else {"state_dict": state}
    if isinstance(model, PeftModel):
        with atomic(out / "adapter") as tmp:
            model.save_pretrained(tmp, **weights)  # PeftModel.from_pretrained reloads it
            write_json(tmp / BASE_FILE, built.fingerprint)
        saved = out / "adapter"
    elif adapter.train:
        with atomic(out / "model") as tmp:
            model.save_pretrained(tmp, **weights)
            built.tokenizer.save_pretrained(tmp)
        saved = out / "model"
    columns = prediction_columns(data.labels)
    rows = prediction_rows("dev", data.dev, val[0], data.labels)
    rows += prediction_rows("test", data.test, test[0], data.labels)
    write_predictions(out / "predictions.csv", columns, rows)
    image = out / "confusion_matrix.png"
    plot_confusion(image, test[1]["confusion_matrix"], data.labels, f"{data.name} test, {adapter.name}")
    golds = [ex.label for ex in data.test]
    logger.log_predictions(columns, rows, data.labels, golds, test[0]["preds"], str(image))
    return saved


def write_metrics(out: Path, metrics: dict, val: tuple, test: tuple, logger, wall: Callable[[], float]) -> dict:
    """metrics.json, and its headline figures as the logger's summary (returned)."""
    metrics.update(val_examples_per_s=val[0]["examples_per_s"], test_examples_per_s=test[0]["examples_per_s"])
    metrics["peak_rss_mb"] = peak_rss_mb()
    if (gpu := peak_gpu_mb()) is not None:
        metrics["peak_gpu_mb"] = gpu
    train_stats = metrics["train"] or {}
    summary = {f"{s}/{k}": metrics[s][k] for s in ("val", "test") for k in (*METRICS, "invalid") if k in metrics[s]}
    summary.update({f"train/{k}": v for k, v in train_stats.items() if k != "losses"})
    summary.update({k: metrics[k] for k in ("trainable_params", "trainable_share", "model_load_s", "peak_rss_mb")})
    summary.update({"data/skipped_rows": metrics["data"]["skipped_rows"]})
    summary["data/left_out"] = sum(metrics["data"]["left_out"].values())
    metrics["wall_time_s"] = summary["wall_time_s"] = wall()  # a resumed run's earlier processes included
    logger.summary(summary)
    write_json(out / "metrics.json", metrics)
    return summary
