"""run(cfg): one experiment from a composed config to its metrics and outputs.

This is the only function that reads the config; everything below it takes plain arguments.
"""

import functools
import logging
import math
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import get_scheduler

from emorec.checkpoint import (
    Interrupted,
    StopSignals,
    checkpoints,
    find_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from emorec.data import subsample
from emorec.distributed import end, from_slurm, gather_predictions, make_accelerator, rank_and_world
from emorec.errors import EmorecError
from emorec.loggers import NullLogger
from emorec.loop import SORT_WINDOW, answer_loss, base_of, first_tokens_differ, label_loss, predict, train
from emorec.metrics import METRICS, classification_metrics
from emorec.model import quantization_config
from emorec.outputs import atomic, plot_confusion, prediction_columns, prediction_rows, write_json, write_predictions
from emorec.prompt import encode_answers, encode_prompts, scoring_answers

log = logging.getLogger(__name__)


def instantiate(node, **kwargs):
    """hydra.utils.instantiate, but a user-facing error raised by the target reaches the user
    as itself rather than wrapped in Hydra's InstantiationException."""
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, EmorecError):
            raise e.__cause__ from None
        raise


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast where the hardware computes bf16 natively (AVX-512 BF16/AMX on CPUs):
    elsewhere it would be emulated and slower than fp32."""
    if precision not in ("auto", "bf16", "fp32"):
        raise EmorecError(f"trainer.precision={precision!r}; use auto, bf16 or fp32")
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def steps_per_epoch(n: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch of loop.train_batches (length-sorted windows of batches)."""
    span = batch_size * SORT_WINDOW
    batches = sum(math.ceil(min(span, n - s) / batch_size) for s in range(0, n, span))
    return batches // grad_accum


def prepare_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise EmorecError(f"cannot write to output_dir={path} ({e.strerror}); choose a writable folder") from None


# Checked before anything loads: (key, test, what it must be). Keys absent from the composed
# config (an adapter without a rank) are skipped.
def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


CHECKS = [
    *[
        (key, lambda v: _int(v) and v > 0, "a positive integer")
        for key in (
            "trainer.batch_size",
            "trainer.eval_batch_size",
            "trainer.eval_streams",
            "trainer.train_streams",
            "trainer.grad_accum",
            "trainer.epochs",
            "trainer.max_length",
            "trainer.log_every",
            "trainer.keep_checkpoints",
            "adapter.r",
            "adapter.num_virtual_tokens",
        )
    ],
    *[
        (key, lambda v: v is None or (_int(v) and v > 0), "a positive integer or null")
        for key in (
            "trainer.max_steps",
            "trainer.num_threads",
            "trainer.max_pass_tokens",
            "dataset.max_train",
            "dataset.max_eval",
        )
    ],
    *[
        (key, lambda v: _int(v) and v >= 0, "an integer >= 0")
        for key in ("trainer.checkpoint_every", "dataset.context_window", "seed")
    ],
    ("optimizer.lr", lambda v: _num(v) and v > 0, "a number > 0"),
    ("adapter.alpha", lambda v: _num(v) and v > 0, "a number > 0"),
    ("adapter.dropout", lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("trainer.warmup_ratio", lambda v: _num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    ("trainer.max_grad_norm", lambda v: v is None or (_num(v) and v > 0), "a number > 0 or null"),
    ("trainer.predict", lambda v: v in ("score", "generate"), "score or generate"),
    ("trainer.scoring", lambda v: v in ("auto", "answer", "first_token"), "auto, answer or first_token"),
    ("trainer.precision", lambda v: v in ("auto", "bf16", "fp32"), "auto, bf16 or fp32"),
    ("resume", lambda v: isinstance(v, (bool, str)), "true, false or a run directory"),
]


def check_config(cfg: DictConfig) -> None:
    """Types and ranges of the settings, and the prompt's fields, before any data or model loads."""
    tree = flatten(OmegaConf.to_container(cfg, resolve=False))
    missing = [k for k, v in tree.items() if v == "???" and not k.startswith("hydra")]
    if missing:
        raise EmorecError(f"{missing[0]} is required and has no value; set it with {missing[0]}=...")
    for key, ok, what in CHECKS:
        value = OmegaConf.select(cfg, key, default=KeyError)
        if value is not KeyError and not ok(value):
            raise EmorecError(f"{key}={value!r} is not valid; it must be {what}")
    labels = cfg.dataset.labels
    if labels is not None and len(set(labels)) != len(labels):
        raise EmorecError(f"dataset.labels {list(labels)} has duplicates; list each label once")
    check_metric(cfg.dataset.metric, cfg.dataset.neutral_label, labels)
    try:
        cfg.prompt.template.format(labels="", text="")
    except (KeyError, IndexError, ValueError) as e:
        raise EmorecError(
            f"prompt.template has an unknown field or a stray brace ({e}); use only {{labels}} and {{text}}"
        ) from None
    if "{text}" not in cfg.prompt.template:
        raise EmorecError("prompt.template has no {text} field; the utterance would not reach the model")
    device = cfg.trainer.device
    if device != "auto":
        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise EmorecError(f"trainer.device={device!r} is not a device; use auto, cpu or cuda") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise EmorecError(f"trainer.device={device!r} but CUDA is not available; use trainer.device=auto or cpu")
    quantization_config(OmegaConf.select(cfg, "model.quantization", default=None))  # bitsandbytes and a GPU


# Settings a resumed run may change: they do not change what is computed.
RESUME_MAY_CHANGE = {"resume", "output_dir", "logger", "trainer.checkpoint_every", "trainer.keep_checkpoints"}
RESUME_MAY_CHANGE |= {"trainer.num_threads", "dataset.data_dir", "sweep_name"}


def check_resume_config(cfg: DictConfig, checkpoint: Path) -> None:
    """A run continues only with the config it started with: anything else would silently mix
    two experiments."""
    saved_path = checkpoint.parent.parent / "config.yaml"
    if not saved_path.is_file():
        return
    saved = flatten(OmegaConf.to_container(OmegaConf.load(saved_path), resolve=False))
    now = flatten(OmegaConf.to_container(cfg, resolve=True))
    changed = [
        k
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k) and not any(k == m or k.startswith(m + ".") for m in RESUME_MAY_CHANGE)
    ]
    if changed:
        k = changed[0]
        raise EmorecError(
            f"resume: {k} is {now.get(k)!r} but the checkpoint's run used {saved.get(k)!r}"
            f"{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}; "
            f"rerun with the overrides in {saved_path}"
        )


def flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def run(cfg: DictConfig) -> dict:
    t = cfg.trainer
    check_config(cfg)
    out = Path(cfg.output_dir)
    checkpoint = find_checkpoint(cfg.resume, out)
    if checkpoint is None and cfg.resume is not True and checkpoints(out):
        raise EmorecError(
            f"{out} holds checkpoints of an earlier run; continue it with resume=true, or choose another hydra.run.dir"
        )
    if checkpoint is not None:
        check_resume_config(cfg, checkpoint)
    from_slurm()
    device = resolve_device(t.device)
    accelerator = make_accelerator(device)
    if accelerator:
        device = accelerator.device  # each process its own GPU
    # Several processes (torchrun, accelerate launch): only the first writes and logs.
    main = rank_and_world(accelerator)[0] == 0
    if main:
        prepare_output_dir(out)
    wall = time.perf_counter()
    seed_everything(cfg.seed)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    bf16 = use_bf16(t.precision, device)

    d = cfg.dataset
    data = instantiate(d.load)
    labels = data.labels  # the config's, or inferred from the data (dataset=csv, labels=null)
    check_metric(d.metric, d.neutral_label, labels)
    neutral = labels.index(d.neutral_label) if d.neutral_label else None
    train_ex = subsample(data.train, d.max_train, cfg.seed)
    dev_ex, test_ex = data.dev[: d.max_dev], data.test[: d.max_eval]
    log.info("%s: %d train, %d dev, %d test examples", d.name, len(train_ex), len(dev_ex), len(test_ex))
    data_stats = {"labels": labels, "context_window": d.context_window, "skipped_rows": data.skipped}
    data_stats["left_out"] = data.left_out

    if main:
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
        # A partial, so the run's config reaches the logger as a plain dict (instantiate would
        # turn keyword arguments into DictConfig nodes and instantiate the _target_s inside them).
        make_logger = instantiate(cfg.logger, _partial_=True)
        logger = make_logger(run_config=OmegaConf.to_container(cfg, resolve=True), dir=str(out))
    else:
        logger = NullLogger()
    try:
        metrics = _run(
            cfg, out, device, bf16, labels, neutral, train_ex, dev_ex, test_ex, logger, checkpoint, accelerator
        )
        metrics["data"] = data_stats
        logger.summary({"data/skipped_rows": data.skipped, "data/left_out": sum(data.left_out.values())})
        metrics["wall_time_s"] = time.perf_counter() - wall
        if main:
            write_json(out / "metrics.json", metrics)
        logger.summary({"wall_time_s": metrics["wall_time_s"]})
    finally:
        logger.finish()
    end(accelerator)
    return metrics


def check_metric(metric: str, neutral_label: str | None, labels: list[str] | None) -> None:
    if metric not in METRICS:
        raise EmorecError(f"dataset.metric={metric!r}; use one of {', '.join(METRICS)}")
    if metric == "micro_f1_no_neutral" and not neutral_label:
        raise EmorecError("dataset.metric=micro_f1_no_neutral needs dataset.neutral_label, the label to leave out")
    if neutral_label and labels is not None and neutral_label not in labels:
        raise EmorecError(f"dataset.neutral_label={neutral_label!r} is not one of dataset.labels {list(labels)}")


def _run(cfg, out, device, bf16, labels, neutral, train_ex, dev_ex, test_ex, logger, checkpoint, accelerator) -> dict:
    t, metric = cfg.trainer, cfg.dataset.metric
    rank, world = rank_and_world(accelerator)
    main = rank == 0

    start = time.perf_counter()
    # Training without an adapter trains the whole model (adapter=full); otherwise the base is frozen.
    full = bool(cfg.adapter.train and cfg.adapter.peft is None)
    # A sequence classifier (model.task_type=SEQ_CLS, e.g. model=minilm_l6) gets a new head over
    # the labels, trains with cross-entropy on it and predicts with it; a causal LM answers.
    classifier = OmegaConf.select(cfg, "model.task_type", default="CAUSAL_LM") == "SEQ_CLS"
    if classifier and t.predict == "generate":
        raise EmorecError(
            f"model={cfg.model.name} is a sequence classifier and cannot generate; use trainer.predict=score"
        )
    # A frozen base is stored in bf16: autocast would otherwise cast every weight at every
    # forward (15 % of a training step here), and it halves the memory. Weights that train stay
    # fp32 (PEFT keeps adapter weights fp32; full fine-tuning keeps the model fp32), so
    # optimizer updates are not rounded away. A classifier's new head trains too (PEFT copies
    # it in the base's dtype), so a classifier stays fp32.
    dtype = torch.bfloat16 if bf16 and t.bf16_base and not full and not classifier else torch.float32
    model, tokenizer = instantiate(cfg.model.load, dtype=dtype, **({"labels": list(labels)} if classifier else {}))
    load_seconds = time.perf_counter() - start
    model.requires_grad_(full)
    # A 4/8-bit base (model.quantization, QLoRA) is placed on its GPU by the loader and cannot move.
    quantized = getattr(model, "is_quantized", False)
    if quantized:
        # PEFT's recipe for k-bit bases: norms in fp32, gradients enabled at the inputs.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.adapter.peft is not None:
        try:
            model = get_peft_model(model, instantiate(cfg.adapter.peft))
        except ValueError as e:
            raise EmorecError(
                f"adapter={cfg.adapter.name} does not fit model {cfg.model.name} ({str(e).splitlines()[0]}); "
                "check adapter.target_modules (or model.lora_target_modules) against the model's module names"
            ) from None
        if bf16:
            # PEFT casts each adapter's input to the adapter's fp32 weights, and autocast casts
            # it back: two copies per adapter call (8 % of a step here). Every forward of this
            # run is under autocast, so the input can stay bf16 (as with PEFT's
            # helpers.disable_input_dtype_casting).
            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    module.cast_input_dtype_enabled = False
    if not quantized:
        model.to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "model %s loaded in %.1f s; %d trainable parameters (%.3f%%)",
        cfg.model.name,
        load_seconds,
        trainable,
        100 * trainable / total,
    )

    template, system = cfg.prompt.template, cfg.prompt.system
    # A classifier's "answer" is the label index its head predicts.
    answers = [[i] for i in range(len(labels))] if classifier else encode_answers(tokenizer, template, system, labels)
    scored = scoring_answers(answers)
    first_token = t.scoring == "first_token" or (t.scoring == "auto" and first_tokens_differ(scored))
    if first_token and not first_tokens_differ(scored):
        raise EmorecError(
            "trainer.scoring=first_token, but some labels' answers start with the same token; "
            "use trainer.scoring=answer (or auto)"
        )
    mode = "classify" if classifier else t.predict
    share = t.share_prefix and not classifier  # an encoder's tokens all see each other
    train_ids, dev_ids, test_ids = (
        encode_prompts(
            tokenizer,
            exs,
            template,
            system,
            labels,
            t.max_length,
            cfg.dataset.context_window,
            cfg.prompt.context,
            cfg.prompt.cue,
        )
        for exs in (train_ex, dev_ex, test_ex)
    )

    def evaluate(ids, examples, desc):
        # Each process predicts every world-th example; all gather all predictions.
        mine = list(range(rank, len(ids), world))
        result = predict(
            model,
            tokenizer,
            [ids[i] for i in mine],
            scored,
            labels,
            mode=mode,
            batch_size=t.eval_batch_size,
            autocast=bf16,
            share_prefix=share,
            first_token=first_token,
            merge=t.merge_adapter,
            pack=t.pack_prefix,
            streams=t.eval_streams,
            desc=desc,
        )
        result = gather_predictions(result, mine, len(ids), accelerator)
        return result, classification_metrics(result["preds"], [ex.label for ex in examples], labels, neutral)

    best = {"value": -math.inf, "epoch": None, "state": None, "val": None}
    train_stats = None
    if cfg.adapter.train:
        if not train_ex:
            raise EmorecError("no training examples; check dataset.max_train or the train split")
        steps = t.max_steps or t.epochs * steps_per_epoch(len(train_ex), t.batch_size, t.grad_accum)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = instantiate(cfg.optimizer)(params)
        scheduler = get_scheduler(
            t.scheduler, optimizer, num_warmup_steps=round(t.warmup_ratio * steps), num_training_steps=steps
        )

        def on_epoch_end(epoch, step):
            if not t.val_every_epoch or not dev_ex:
                return
            result, m = evaluate(dev_ids, dev_ex, f"val epoch {epoch}")
            logger.log({f"val/{k}": m[k] for k in METRICS if k in m}, step)
            log.info("epoch %d step %d: val %s %.4f, accuracy %.4f", epoch, step, metric, m[metric], m["accuracy"])
            # Keep the best adapter by the metric of record (in memory: adapters are small).
            if m[metric] > best["value"]:
                state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                best.update(value=m[metric], epoch=epoch, state=state, val=(result, m))

        def save(progress: dict) -> Path | None:
            generator = progress.pop("generator")
            # Every process holds the same state; the first writes it, the others wait for it.
            path = None
            if main:
                path = save_checkpoint(
                    out,
                    progress["step"],
                    weights={n: p for n, p in model.named_parameters() if p.requires_grad},
                    best=best["state"],
                    tensors={
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(),
                        "generator": generator,
                    },
                    state={"progress": progress, "best_value": best["value"], "best_epoch": best["epoch"]},
                    keep=t.keep_checkpoints,
                )
            if accelerator:
                accelerator.wait_for_everyone()
            return path

        progress = None
        if checkpoint is not None:
            progress = restore(checkpoint, model, optimizer, scheduler, best)
            log.info("resuming from %s at step %d", checkpoint, progress["step"])
        train_ids_answers = [answers[ex.label] for ex in train_ex]
        trained = model
        if accelerator:
            # The engine wraps the model (DDP, or DeepSpeed ZeRO-1/2 if `accelerate config` selects
            # it) and the optimizer. The scheduler stays plain: it steps once per optimizer step, as with one
            # process (accelerate's wrapper would step it once per process).
            trained, optimizer = accelerator.prepare(model, optimizer)
        signals = StopSignals()
        with signals:
            try:
                train_stats = train(
                    trained,
                    train_ids,
                    train_ids_answers,
                    tokenizer.pad_token_id,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    steps=steps,
                    batch_size=t.batch_size,
                    grad_accum=t.grad_accum,
                    max_grad_norm=t.max_grad_norm,
                    autocast=bf16,
                    share_prefix=share,
                    seed=cfg.seed,
                    log_every=t.log_every,
                    log=logger.log,
                    on_epoch_end=on_epoch_end,
                    checkpoint=save,
                    checkpoint_every=t.checkpoint_every,
                    stop=lambda: signals.received,
                    progress=progress,
                    max_pass_tokens=t.max_pass_tokens,
                    accelerator=accelerator,
                    streams=t.train_streams,
                    loss_fn=label_loss if classifier else functools.partial(answer_loss, pack=t.pack_prefix),
                )
            except Interrupted:
                # Checkpointed: hand the signal on (submitit requeues on its SIGUSR2), then stop.
                signals.forward()
                raise
        if best["state"] is not None:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in best["state"]:
                        p.copy_(best["state"][n])
        log.info(
            "trained %d steps in %.0f s: %.2f examples/s, %.0f tokens/s",
            train_stats["steps"],
            train_stats["seconds"],
            train_stats["examples_per_s"],
            train_stats["tokens_per_s"],
        )

    val_result, val_m = best["val"] or evaluate(dev_ids, dev_ex, "val")
    test_result, test_m = evaluate(test_ids, test_ex, "test")
    log.info(
        "test %s %.4f, accuracy %.4f, macro F1 %.4f", metric, test_m[metric], test_m["accuracy"], test_m["macro_f1"]
    )

    if not main:
        return {"val": val_m, "test": test_m, "train": train_stats}
    if isinstance(model, PeftModel):
        with atomic(out / "adapter") as tmp:
            model.save_pretrained(tmp)  # safetensors; PeftModel.from_pretrained reloads it
    elif cfg.adapter.train:
        with atomic(out / "model") as tmp:
            model.save_pretrained(tmp)  # full fine-tuning: the whole model, as safetensors
            tokenizer.save_pretrained(tmp)
    columns = prediction_columns(labels)
    rows = prediction_rows("dev", dev_ex, val_result, labels) + prediction_rows("test", test_ex, test_result, labels)
    write_predictions(out / "predictions.csv", columns, rows)
    image = out / "confusion_matrix.png"
    plot_confusion(image, test_m["confusion_matrix"], labels, f"{cfg.dataset.name} test, {cfg.adapter.name}")

    metrics = {
        "model": cfg.model.name,
        "adapter": cfg.adapter.name,
        "dataset": cfg.dataset.name,
        "metric": metric,
        "predict": mode,
        "scoring": ("first_token" if first_token else "answer") if mode == "score" else None,
        "precision": "bf16" if bf16 else "fp32",
        "val": val_m,
        "test": test_m,
        "best_epoch": best["epoch"],
        "train": train_stats,
        "trainable_params": trainable,
        "total_params": total,
        "embedding_params": base_of(model).get_input_embeddings().weight.numel(),
        "trainable_share": trainable / total,
        "model_load_s": load_seconds,
        "val_examples_per_s": val_result["examples_per_s"],
        "test_examples_per_s": test_result["examples_per_s"],
        "peak_rss_mb": peak_rss_mb(),
    }
    summary = {f"{s}/{k}": metrics[s][k] for s in ("val", "test") for k in (*METRICS, "invalid") if k in metrics[s]}
    summary.update({f"train/{k}": v for k, v in (train_stats or {}).items() if k != "losses"})
    summary.update({k: metrics[k] for k in ("trainable_params", "trainable_share", "model_load_s", "peak_rss_mb")})
    logger.summary(summary)
    logger.log_predictions(columns, rows, labels, [ex.label for ex in test_ex], test_result["preds"], str(image))
    return metrics


def restore(path: Path, model, optimizer, scheduler, best: dict) -> dict:
    """Load a checkpoint into the model, optimizer, scheduler, best-so-far and RNGs; returns the
    training loop's progress."""
    saved = load_checkpoint(path)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(saved["weights"]):
        raise EmorecError(f"checkpoint {path} holds other weights than this run trains; resume with the same adapter")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved["weights"][n])
    optimizer.load_state_dict(saved["tensors"]["optimizer"])
    scheduler.load_state_dict(saved["tensors"]["scheduler"])
    state = saved["state"]
    # The best epoch's validation is recomputed from its weights at the end (deterministic).
    best.update(value=state["best_value"], epoch=state["best_epoch"], state=saved["best"], val=None)
    restore_rng(state, saved["tensors"]["torch_rng"])
    return {**state["progress"], "generator": saved["tensors"]["generator"]}
