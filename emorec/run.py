"""run(cfg): one experiment from a composed config to its metrics and outputs, in phases: set up
the environment, load the splits, build the model, choose the speed components, build the task,
fit, evaluate, export.

`run` is the only function that reads the whole config; each phase takes the parts it needs.
"""

import logging
import platform
import random
import re
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import get_scheduler

from emorec.adapters import init_from_text, prepare
from emorec.batches import steps_per_epoch
from emorec.checkpoint import Interrupted, StopSignals, checkpoints, find_checkpoint, tidy_checkpoints
from emorec.data import subsample
from emorec.distributed import end, from_slurm, gather_predictions, is_main_process, make_accelerator, rank_and_world
from emorec.errors import EmorecError
from emorec.fast import Engine, Fast, dispatch, dispatch_attention, dispatch_backward, optimizer_options
from emorec.head import decoder_classifier, head_parameters
from emorec.loggers import NullLogger
from emorec.metrics import METRICS, classification_metrics
from emorec.model import BASE_FILE, base_fingerprint, check_base
from emorec.outputs import (
    atomic,
    plot_confusion,
    prediction_columns,
    prediction_rows,
    run_directory_lock,
    write_json,
    write_predictions,
)
from emorec.predict import predict
from emorec.prompt import Context, encode_answers, encode_prompts, join_labels, scoring_answers
from emorec.reference import base_of, first_tokens_differ, is_quantized
from emorec.settings import check_config, check_labels, check_resume_config, is_encoder
from emorec.tasks import Balance, LabelHead, LabelWords, SequenceClassifier
from emorec.train import Checkpointer, KeepBest, LogLoss, Passes, Plan, WallClock, train

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    check_config(cfg)
    # One run at a time in a directory: the first process locks it until the run ends.
    with run_directory_lock(Path(cfg.output_dir), is_main_process()):
        env = setup(cfg.trainer, cfg.seed, Path(cfg.output_dir), cfg.resume)
        if env.checkpoint is not None:
            check_resume_config(cfg, env.checkpoint)
        data = load_splits(cfg.dataset, cfg.seed)
        logger = make_logger(cfg.logger, OmegaConf.to_container(cfg, resolve=True), env.out, env.main, bool(cfg.resume))
        try:
            fast = Fast(**cfg.fast)
            model, tokenizer, load_s = build_model(cfg.model, cfg.adapter, cfg.head, cfg.prompt, fast, env, data.labels)
            engine = dispatch(model, fast, env.device, cfg.trainer.max_pass_tokens)
            log.info("speed components: %s", engine.chosen)
            targets = [ex.label for ex in data.train]
            balance = Balance.of(targets, len(data.labels), cfg.trainer.balance, cfg.trainer.logit_adjust)
            kind = "encoder" if is_encoder(cfg.model) else cfg.head.name
            task = build_task(tokenizer, cfg.prompt, cfg.trainer, data.labels, engine, kind, balance)
            ids = encode(tokenizer, cfg.prompt, data, cfg.trainer.max_length, cfg.dataset.context_window)
            evaluate = evaluator(model, task, engine, env, cfg.trainer.eval_batch_size, data)
            validate = (lambda desc: evaluate(ids["dev"], data.dev, desc)) if data.dev else None
            best = KeepBest(model, validate, data.metric, logger.log)
            training = (ids["train"], targets)
            train_stats = None
            if cfg.adapter.train:
                optimizer = Optimizer(instantiate(cfg.optimizer), cfg.head.get("lr"))
                train_stats = fit(model, task, engine, training, cfg.trainer, optimizer, env, logger, best)
            val = best.val or evaluate(ids["dev"], data.dev, "val")
            test = evaluate(ids["test"], data.test, "test")
            m = test[1]
            log.info(
                "test %s %.4f, accuracy %.4f, macro F1 %.4f", data.metric, m[data.metric], m["accuracy"], m["macro_f1"]
            )
            metrics = {
                "model": cfg.model.name,
                "adapter": cfg.adapter.name,
                "head": cfg.head.name,
                "encoder": kind == "encoder",
            }
            metrics.update(describe(model, task, engine, env, data))
            metrics.update(val=val[1], test=test[1], best_epoch=best.epoch, train=train_stats, model_load_s=load_s)
            if env.main:
                saved = export(env.out, model, tokenizer, data, val, test, logger, cfg.adapter)
                summary = write_metrics(env.out, metrics, val, test, logger, env.wall)
                if saved is not None:
                    logger.log_model(saved, summary)
        finally:
            logger.finish()
        end(env.accelerator)
        return metrics


def instantiate(node, **kwargs):
    """hydra.utils.instantiate, but a user-facing error raised by the target reaches the user
    as itself rather than wrapped in Hydra's InstantiationException."""
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, EmorecError):
            raise e.__cause__ from None
        raise


@dataclass
class Env:
    """Where and how this process runs."""

    out: Path
    seed: int
    device: torch.device
    bf16: bool
    accelerator: object
    checkpoint: Path | None
    start: float
    earlier: float = 0.0  # wall seconds the run took in earlier processes, up to its checkpoint

    def wall(self) -> float:
        """The run's wall time so far, a resumed run's earlier processes included."""
        return self.earlier + time.perf_counter() - self.start

    @property
    def rank_world(self) -> tuple[int, int]:
        return rank_and_world(self.accelerator)

    @property
    def main(self) -> bool:
        return self.rank_world[0] == 0


def setup(trainer: DictConfig, seed: int, out: Path, resume) -> Env:
    """The checkpoint to continue from (what a killed run left half-written tidied first), the
    device (each process its own GPU with several), seeds, threads and precision."""
    if is_main_process():  # with the directory locked: what a killed run left half-written
        tidy_checkpoints(out)
    checkpoint = find_checkpoint(resume, out)
    if checkpoint is None and resume is not True and checkpoints(out):
        raise EmorecError(
            f"{out} holds checkpoints of an earlier run; continue it with resume=true, or choose another hydra.run.dir"
        )
    from_slurm()
    device = resolve_device(trainer.device)
    accelerator = make_accelerator(device)
    device = accelerator.device if accelerator else device
    env = Env(out, seed, device, use_bf16(trainer.precision, device), accelerator, checkpoint, time.perf_counter())
    seed_everything(seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the run's own peak, in a process that ran others
    if trainer.num_threads:
        torch.set_num_threads(trainer.num_threads)
    return env


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast where the hardware computes bf16 natively (tensor cores from Ampere, compute
    capability 8.0, on; AVX-512 BF16/AMX on CPUs): elsewhere it is emulated and slower than
    fp32 (torch.cuda.is_bf16_supported() counts emulation on a V100 or T4 as support)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@dataclass
class Data:
    name: str
    metric: str
    labels: list[str]
    neutral: int | None
    train: list
    dev: list
    test: list
    stats: dict


def load_splits(dataset: DictConfig, seed: int) -> Data:
    """The dataset's splits, cut to the configured sizes (train: a seeded sample)."""
    splits = instantiate(dataset.load)
    labels = splits.labels  # the config's, or inferred from the data (dataset=csv, labels=null)
    check_labels(labels, dataset.neutral_label)
    neutral = labels.index(dataset.neutral_label) if dataset.neutral_label else None
    train = subsample(splits.train, dataset.max_train, seed)
    dev, test = splits.dev[: dataset.max_dev], splits.test[: dataset.max_eval]
    log.info("%s: %d train, %d dev, %d test examples", dataset.name, len(train), len(dev), len(test))
    stats = {"labels": labels, "context_window": dataset.context_window, "skipped_rows": splits.skipped}
    stats["left_out"] = splits.left_out
    stats["train_counts"] = {labels[i]: n for i, n in sorted(Counter(ex.label for ex in train).items())}
    return Data(dataset.name, dataset.metric, labels, neutral, train, dev, test, stats)


def make_logger(logger: DictConfig, run_config: dict, out: Path, main: bool, resume: bool):
    """The run's logger (the first process only), and the resolved config saved beside it. A
    resumed run's logger continues the run it logged to before."""
    if not main:
        return NullLogger()
    OmegaConf.save(OmegaConf.create(run_config), out / "config.yaml")
    # A partial, so the run's config reaches the logger as a plain dict (instantiate would turn
    # keyword arguments into DictConfig nodes and instantiate the _target_s inside them).
    return instantiate(logger, _partial_=True)(run_config=run_config, dir=str(out), resume=resume)


def build_model(model_cfg, adapter, head, prompt, fast: Fast, env: Env, labels: list[str], saved: Path | None = None):
    """(model with its head and adapter on its device, tokenizer, load seconds). Without an
    adapter (adapter=full) the whole model trains; otherwise the base is frozen. `saved`: a
    finished run's adapter folder (or, for adapter=full, its model folder) to load, frozen,
    instead of a new adapter (emorec.trained)."""
    start = time.perf_counter()
    full = bool(adapter.train and adapter.peft is None)
    encoder = is_encoder(model_cfg)
    decoder_head = head.name == "classifier" and not encoder
    whole = full and saved is not None  # a fine-tuned whole model to load, head and all
    # A frozen base is stored in bf16: autocast would otherwise cast every weight at every
    # forward (15 % of a training step here), and it halves the memory. Weights that train stay
    # fp32 (PEFT keeps adapter weights fp32, emorec.head makes a decoder's head fp32; full
    # fine-tuning keeps the model fp32), so optimizer updates are not rounded away. An encoder's
    # new head trains too and PEFT copies it in the base's dtype, so an encoder stays fp32.
    dtype = torch.bfloat16 if env.bf16 and fast.bf16_base and not full and not encoder else torch.float32
    load = saved_model(saved, encoder or decoder_head, model_cfg.load) if whole else model_cfg.load
    options = {"dtype": dtype, "device": env.device}
    if encoder or (whole and decoder_head):
        options["labels"] = list(labels)
    if "attn_implementation" in load:
        options["attn_implementation"] = dispatch_attention(model_cfg.load.attn_implementation, env.device, dtype)
    model, tokenizer = instantiate(load, **options)
    load_seconds = time.perf_counter() - start
    if saved and not whole:
        check_base(model, saved, model_cfg.name)
    if decoder_head and not whole:
        # Only a head started from the label words needs their first tokens (and needs them distinct).
        first = label_tokens(tokenizer, prompt, labels) if head.init == "labels" else None
        model = decoder_classifier(model, labels, tokenizer.pad_token_id, head.init, first)
    # A 4/8-bit base (QLoRA) stays as loaded: its norms and embeddings in the compute dtype
    # (PEFT's prepare_model_for_kbit_training would copy them to fp32, 2 GB at 8 B; RMSNorm
    # computes in fp32 anyway), and never trained whole (settings refuse adapter=full on it).
    model.requires_grad_(full and saved is None)
    if adapter.peft is not None:
        model = add_adapter(model, adapter, decoder_head, env.bf16, model_cfg.name, saved)
        if adapter.get("init") == "text" and not saved:
            text = adapter.init_text or prompt.template.format(labels=join_labels(labels), text="").strip()
            init_from_text(model, tokenizer(text, add_special_tokens=False)["input_ids"])
    if not is_quantized(model):  # bitsandbytes placed a quantised base, which cannot move
        model.to(env.device)  # the weights came there; a prompt-learning adapter's new ones may not have
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "model %s loaded in %.1f s; %d trainable parameters (%.3f%%)",
        model_cfg.name,
        load_seconds,
        trainable,
        100 * trainable / total,
    )
    return model, tokenizer, load_seconds


def saved_model(folder: Path, classifier: bool, load: DictConfig) -> DictConfig:
    """How to load a whole model that a run fine-tuned (adapter=full) from its folder: as the
    run loaded its base (`load`), attention implementation included."""
    target = "emorec.model.load_classifier" if classifier else "emorec.model.load_pretrained"
    node = {"_target_": target, "name_or_path": str(folder)}
    if "attn_implementation" in load:
        node["attn_implementation"] = load.attn_implementation
    return OmegaConf.create(node)


def label_tokens(tokenizer, prompt: DictConfig, labels: list[str]) -> list[int]:
    """Each label's first answer token: the head's rows under head.init=labels."""
    first = [a[0] for a in scoring_answers(encode_answers(tokenizer, prompt.template, prompt.system, labels))]
    if len(set(first)) < len(first):
        raise EmorecError(
            "head.init=labels needs labels whose answers start with different tokens; "
            "reword dataset.labels or use head.init=random"
        )
    return first


def add_adapter(model, adapter: DictConfig, decoder_head: bool, bf16: bool, model_name: str, saved: Path | None):
    """The model under its PEFT adapter (its base frozen): a new one, or the one saved in `saved`."""
    try:
        if saved:
            model = PeftModel.from_pretrained(model, saved)
        else:
            model = get_peft_model(model, prepare(instantiate(adapter.peft), adapter.get("init"), decoder_head))
    except ValueError as e:
        raise EmorecError(
            f"adapter={adapter.name} does not fit model {model_name} ({str(e).splitlines()[0]}); "
            "check adapter.target_modules (or model.lora_target_modules) against the model's module names"
        ) from None
    if bf16:
        # PEFT casts each adapter's input to the adapter's fp32 weights, and autocast casts it
        # back: two copies per adapter call (8 % of a step here). Every forward of this run is
        # under autocast, so the input can stay bf16 (as with PEFT's
        # helpers.disable_input_dtype_casting).
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    return model


def build_task(
    tokenizer, prompt: DictConfig, trainer: DictConfig, labels: list[str], engine: Engine, kind: str, balance
):
    """The task of a `kind` of model: lm (label words), classifier (a decoder's head) or encoder."""
    if kind == "encoder":
        return SequenceClassifier(tokenizer.pad_token_id, balance)
    if kind == "classifier":
        return LabelHead(labels, tokenizer.pad_token_id, engine.answers, balance)
    answers = encode_answers(tokenizer, prompt.template, prompt.system, labels)
    scored = scoring_answers(answers)
    first_token = trainer.scoring == "first_token" or (trainer.scoring == "auto" and first_tokens_differ(scored))
    if first_token and not first_tokens_differ(scored):
        raise EmorecError(
            "trainer.scoring=first_token, but some labels' answers start with the same token; "
            "use trainer.scoring=answer (or auto)"
        )
    generate = tokenizer if trainer.predict == "generate" else None
    return LabelWords(answers, scored, labels, tokenizer.pad_token_id, first_token, engine.answers, generate, balance)


def encode(tokenizer, prompt: DictConfig, data: Data, max_length: int, context_window: int) -> dict:
    """Each split's prompts as token ids."""
    context = Context(prompt.context, prompt.context_layout, prompt.context_after)
    return {
        split: encode_prompts(
            tokenizer,
            getattr(data, split),
            prompt.template,
            prompt.system,
            data.labels,
            max_length,
            context_window,
            context,
            prompt.cue,
        )
        for split in ("train", "dev", "test")
    }


def evaluator(model, task, engine: Engine, env: Env, batch_size: int, data: Data):
    """evaluate(ids, examples, desc) -> (predictions, metrics). Each process predicts every
    world-th example; all gather all predictions."""
    rank, world = env.rank_world

    def evaluate(ids: list[list[int]], examples: list, desc: str) -> tuple[dict, dict]:
        mine = list(range(rank, len(ids), world))
        result = predict(
            model, task, [ids[i] for i in mine], engine, batch_size=batch_size, autocast=env.bf16, desc=desc
        )
        result = gather_predictions(result, mine, len(ids), env.accelerator)
        golds = [ex.label for ex in examples]
        return result, classification_metrics(result["preds"], golds, data.labels, data.neutral)

    return evaluate


@dataclass(frozen=True)
class Optimizer:
    """The optimizer of a run: `make` (conf/optimizer's partial) over the trainable parameters, a
    classifier head's in a group of its own learning rate where head.lr sets one."""

    make: object
    head_lr: float | None = None

    def build(self, model, device: torch.device):
        params = [p for p in model.parameters() if p.requires_grad]
        head = {id(p) for p in head_parameters(model)} if self.head_lr else set()
        groups = [{"params": [p for p in params if id(p) not in head]}]
        if head:
            groups.append({"params": [p for p in params if id(p) in head], "lr": self.head_lr})
        return self.make(groups, **optimizer_options(self.make, device))


def fit(
    model, task, engine: Engine, training: tuple, trainer: DictConfig, optimizer: Optimizer, env: Env, logger, best
):
    """Train (continuing from env.checkpoint), validating at epoch ends through `best` (KeepBest),
    then put back the best epoch's weights; returns the training figures."""
    prompts, targets = training
    if not prompts:
        raise EmorecError("no training examples; check dataset.max_train or the train split")
    steps = trainer.max_steps or trainer.epochs * steps_per_epoch(len(prompts), trainer.batch_size, trainer.grad_accum)
    optimizer = optimizer.build(model, env.device)
    warmup = round(trainer.warmup_ratio * steps)
    scheduler = get_scheduler(trainer.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    trained = model
    if env.accelerator:
        # The engine wraps the model (DDP, or DeepSpeed ZeRO-1/2 if `accelerate config` selects it)
        # and the optimizer. The scheduler stays plain: it steps once per optimizer step, as with
        # one process (accelerate's wrapper would step it once per process).
        trained, optimizer = env.accelerator.prepare(model, optimizer)

    def loss_of(rows: list[int]) -> torch.Tensor:
        # Autocast is per thread: each training stream sets its own.
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.bf16):
            return task.loss(trained, [prompts[j] for j in rows], [targets[j] for j in rows])

    def shared_length(rows: list[int]) -> int:
        return task.shared_length(trained, [prompts[j] for j in rows])

    passes = Passes(loss_of, task.lengths(prompts, targets), shared_length, engine.max_pass_tokens)
    backward = dispatch_backward(trained, passes, engine.train_streams, env.accelerator)
    signals = StopSignals()
    checkpointer = Checkpointer(
        env.out,
        model,
        optimizer,
        scheduler,
        best,
        every=trainer.checkpoint_every,
        keep=trainer.keep_checkpoints,
        stop=lambda: signals.received,
        backward=backward,
    )
    progress = checkpointer.restore(env.checkpoint) if env.checkpoint is not None else None
    if progress is not None:
        log.info("resuming from %s at step %d", env.checkpoint, progress.step)
        env.earlier = progress.wall_seconds
    log_loss = LogLoss(logger.log, scheduler, trainer.log_every, steps, progress.step if progress else 0, env.main)
    validating = [best] if trainer.val_every_epoch and best.evaluate else []
    clock = WallClock(env.wall)  # after validation, before the checkpointer saves the progress
    plan = Plan(steps, trainer.batch_size, trainer.grad_accum, trainer.max_grad_norm, env.seed)
    with signals:
        try:
            progress = train(
                trained, backward, optimizer, scheduler, plan, [log_loss, *validating, clock, checkpointer], progress
            )
        except Interrupted:
            # Checkpointed: hand the signal on (submitit requeues on its SIGUSR2), then stop.
            signals.forward()
            raise
    best.restore()
    stats = progress.summary()
    log.info(
        "trained %d steps in %.0f s: %.2f examples/s, %.0f tokens/s",
        stats["steps"],
        stats["seconds"],
        stats["examples_per_s"],
        stats["tokens_per_s"],
    )
    return stats


def describe(model, task, engine: Engine, env: Env, data: Data) -> dict:
    """What ran: the task, precision, parameter counts and the speed components."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {
        "dataset": data.name,
        "metric": data.metric,
        **task.describe(),
        "precision": "bf16" if env.bf16 else "fp32",
        "hardware": hardware(env.device, env.rank_world[1]),
        "trainable_params": trainable,
        "total_params": total,
        "embedding_params": base_of(model).get_input_embeddings().weight.numel(),
        "trainable_share": trainable / total,
        "fast": engine.chosen,
        "data": data.stats,
    }


def hardware(device: torch.device, processes: int) -> dict:
    """The machine behind a run's speed and its precision choice: results from different machines
    (a CPU with AVX-512 BF16 runs bf16, one with AVX2 only runs fp32) stay told apart."""
    if device.type == "cuda":
        name, threads, isa = torch.cuda.get_device_name(device), None, None
    else:
        name, threads = cpu_name(), torch.get_num_threads()
        isa = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else None
    return {"device": device.type, "name": name, "processes": processes, "threads": threads, "cpu_isa": isa}


def cpu_name() -> str:
    try:
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        found = None
    return found.group(1).strip() if found else platform.processor() or "unknown CPU"


def export(out: Path, model, tokenizer, data: Data, val: tuple, test: tuple, logger, adapter: DictConfig):
    """The trained adapter (or, trained without one, the whole model) as safetensors, the
    predictions and the test confusion matrix; the predictions also to the logger. Returns
    the folder the weights went to (None when nothing trained)."""
    saved = None
    if isinstance(model, PeftModel):
        with atomic(out / "adapter") as tmp:
            model.save_pretrained(tmp)  # PeftModel.from_pretrained reloads it
            write_json(tmp / BASE_FILE, base_fingerprint(model))
        saved = out / "adapter"
    elif adapter.train:
        with atomic(out / "model") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        saved = out / "model"
    columns = prediction_columns(data.labels)
    rows = prediction_rows("dev", data.dev, val[0], data.labels) + prediction_rows(
        "test", data.test, test[0], data.labels
    )
    write_predictions(out / "predictions.csv", columns, rows)
    image = out / "confusion_matrix.png"
    plot_confusion(image, test[1]["confusion_matrix"], data.labels, f"{data.name} test, {adapter.name}")
    golds = [ex.label for ex in data.test]
    logger.log_predictions(columns, rows, data.labels, golds, test[0]["preds"], str(image))
    return saved


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_metrics(out: Path, metrics: dict, val: tuple, test: tuple, logger, wall: Callable[[], float]) -> dict:
    """metrics.json, and its headline figures as the logger's summary (returned)."""
    metrics.update(val_examples_per_s=val[0]["examples_per_s"], test_examples_per_s=test[0]["examples_per_s"])
    metrics["peak_rss_mb"] = peak_rss_mb()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        metrics["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
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
