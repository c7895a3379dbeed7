"""run(cfg): one experiment from a composed config to its metrics and outputs, in phases: set up
the environment, load the splits, build the model and what serves it, fit, evaluate, export.

`run` is the only function that reads the whole config; each phase takes the parts it needs.
The machinery lives elsewhere: the builder (emorec.build, shared with emorec.inference), the
environment (emorec.env), the data (emorec.data), the loop (emorec.train), what a run writes
(emorec.results).
"""

import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import get_scheduler

from emorec.auxiliary import HEAD, SpeakerTask, attach_head, detach_head, speaker_loss, speaker_task
from emorec.batches import steps_per_epoch
from emorec.build import Built, Optimizer, Spec, build, prompt_format, prompts_of
from emorec.callbacks import Average, Checkpointer, Keep, KeepBest, LogLoss, WallClock, WholeState
from emorec.checkpoint import FOLDER, Interrupted, StopSignals, checkpoints, find_checkpoint, tidy_checkpoints
from emorec.data.records import SPLITS
from emorec.data.splits import Data, load_splits
from emorec.demonstrations import with_demonstrations
from emorec.distributed import end, from_slurm, gather_predictions, is_main_process, make_accelerator
from emorec.env import Env, reset_peak_rss, resolve_device, rss_mb, seed_everything
from emorec.errors import EmorecError, instantiate
from emorec.evaluate import predict
from emorec.fast import use_bf16
from emorec.loggers import make_logger
from emorec.metrics import classification_metrics
from emorec.outputs import run_directory_lock
from emorec.results import describe, export, write_metrics
from emorec.settings import check_config, check_resume_config
from emorec.sharded import ShardedState, equal_forwards, gathered_state, is_sharded, leave_group
from emorec.tasks import Balance
from emorec.tensors import trained_weights
from emorec.train import Passes, Plan, train

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    check_config(cfg)
    # One run at a time in a directory: the first process locks it until the run ends.
    with run_directory_lock(Path(cfg.output_dir), is_main_process()):
        env = setup(cfg.trainer, cfg.seed, Path(cfg.output_dir), cfg.resume)
        if env.checkpoint is not None:
            check_resume_config(cfg, env.checkpoint)
        data = load_splits(cfg.dataset, cfg.seed)
        prompt = cfg.prompt
        data = with_demonstrations(data, prompt.demonstrations, prompt.demonstrations_by, prompt.demonstrations_encoder)
        logger = make_logger(cfg.logger, OmegaConf.to_container(cfg, resolve=True), env.out, env.main, bool(cfg.resume))
        try:
            targets = [ex.label for ex in data.train]
            balance = Balance.of(targets, len(data.labels), cfg.trainer.balance, cfg.trainer.logit_adjust)
            spec = Spec.of(cfg)
            before = rss_mb()  # what the model, training and evaluation add to it: emorec plan's estimate
            built = build(spec, env, data.labels, balance)
            memory = {"before_model": before, "model": rss_mb()}
            reset_peak_rss()
            window = cfg.dataset.context_window
            ids = {s: prompts_of(built.tokenizer, spec, getattr(data, s), data.labels, window) for s in SPLITS}
            evaluate = evaluator(built, env, cfg.trainer.eval_batch_size, data)
            validate = (lambda desc: evaluate(ids["dev"], data.dev, desc)) if data.dev else None
            best = KeepBest(built.model, validate, data.metric, logger.log, cfg.trainer.patience)
            train_stats = None
            if cfg.adapter.train:
                optimizer = Optimizer(instantiate(cfg.optimizer), cfg.head.get("lr"))
                aux = auxiliary(built.tokenizer, spec, data.train, cfg.seed, window)
                train_stats = fit(built, (ids["train"], targets, aux), cfg.trainer, optimizer, env, logger, best)
            val = best.val or evaluate(ids["dev"], data.dev, "val")
            test = evaluate(ids["test"], data.test, "test")
            m = test[1]
            log.info(
                "test %s %.4f, accuracy %.4f, macro F1 %.4f", data.metric, m[data.metric], m["accuracy"], m["macro_f1"]
            )
            metrics = {"model": cfg.model.name, "adapter": cfg.adapter.name, "head": cfg.head.name}
            metrics["encoder"] = spec.kind == "encoder"
            metrics.update(describe(built, env, data))
            metrics.update(val=val[1], test=test[1], best_epoch=best.epoch, train=train_stats)
            metrics["model_load_s"] = built.load_seconds
            # Tokens per prompt: what context, speakers and demonstrations cost.
            metrics["prompt_tokens"] = {s: sum(map(len, ids[s])) / len(ids[s]) for s in SPLITS if ids[s]}
            # Host memory (MB): before the model, with it built, at most while training and evaluating.
            metrics["rss_mb"] = {**memory, "peak_after_model": rss_mb(peak=True)}
            # A sharded model's trained weights, gathered whole to the first process (all take part).
            state = gathered_state(built.model) if cfg.adapter.train and is_sharded(built.model) else None
            if env.main:
                saved = export(env.out, built, data, (val, test), logger, cfg.adapter, state)
                summary = write_metrics(env.out, metrics, val, test, logger, env.wall)
                if saved is not None:
                    logger.log_model(saved, summary)
        finally:
            logger.finish()
        end(env.accelerator)
        leave_group()
        return metrics


def setup(trainer: DictConfig, seed: int, out: Path, resume) -> Env:
    """The checkpoint to continue from (what a killed run left half-written tidied first), the
    device (each process its own GPU with several), seeds, threads and precision."""
    if is_main_process():  # with the directory locked: what a killed run left half-written
        tidy_checkpoints(out)
    checkpoint = find_checkpoint(resume, out)
    if checkpoint is None and resume is True:
        # A checkpoints folder without a complete checkpoint: a run killed while writing its first
        # one (tidied away above), worth a warning; no folder at all is a first start (a study's jobs).
        say = log.warning if (out / FOLDER).is_dir() else log.info
        say("resume=true: no complete checkpoint in %s: starting from the beginning", out / FOLDER)
    if checkpoint is None and resume is not True and checkpoints(out):
        raise EmorecError(
            f"{out} holds checkpoints of an earlier run; continue it with resume=true, or choose another hydra.run.dir"
        )
    from_slurm()
    device = resolve_device(trainer.device)
    accelerator = make_accelerator(device)
    device = accelerator.device if accelerator else device
    env = Env(out, seed, device, use_bf16(trainer.precision, device), accelerator, checkpoint)
    seed_everything(seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the run's own peak, in a process that ran others
    if trainer.num_threads:
        torch.set_num_threads(trainer.num_threads)
    return env


def evaluator(built: Built, env: Env, batch_size: int, data: Data):
    """evaluate(ids, examples, desc) -> (predictions, metrics). Each process predicts every
    world-th example; all gather all predictions."""
    rank, world = env.rank_world

    def evaluate(ids: list[list[int]], examples: list, desc: str) -> tuple[dict, dict]:
        mine = list(range(rank, len(ids), world))
        prompts = [ids[i] for i in mine]
        # Sharded, every process runs as many forwards (each gathers the weights from all).
        even = equal_forwards(built.model, built.tokenizer.pad_token_id) if is_sharded(built.model) else nullcontext()
        with even:
            result = predict(
                built.model, built.task, prompts, built.engine, batch_size=batch_size, autocast=env.bf16, desc=desc
            )
        result = gather_predictions(result, mine, len(ids), env.accelerator)
        golds = [ex.label for ex in examples]
        return result, classification_metrics(result["preds"], golds, data.labels, data.neutral)

    return evaluate


def auxiliary(tokenizer, spec: Spec, train: list, seed: int, window: int) -> SpeakerTask | None:
    """The auxiliary task's training examples (trainer.aux), or None."""
    if "speaker" not in spec.trainer.aux:
        return None
    fmt, question = prompt_format(spec.prompt), spec.prompt.speaker_question
    task = speaker_task(tokenizer, fmt, question, train, spec.trainer.aux_ratio, seed, spec.trainer.max_length, window)
    log.info("trainer.aux: %d speaker-identification examples over %d speakers", len(task.prompts), len(task.names))
    return task


def fit(built: Built, training: tuple, trainer: DictConfig, optimizer: Optimizer, env: Env, logger, best: KeepBest):
    """Train (continuing from env.checkpoint), validating at epoch ends through `best`, then put
    back the best epoch's weights; returns the training figures. `training`: (prompts, targets,
    an auxiliary task or None)."""
    prompts, targets, aux = training
    if not prompts:
        raise EmorecError("no training examples; check dataset.max_train or the train split")
    rows = len(prompts) + (len(aux.prompts) if aux else 0)
    steps = trainer.max_steps or trainer.epochs * steps_per_epoch(rows, trainer.batch_size, trainer.grad_accum)
    model = built.model
    if aux is not None:  # before the optimizer, DDP and checkpoints see the weights
        attach_head(model, built.tokenizer, aux.names)
    optimizer = optimizer.build(model, env.device)
    warmup = round(trainer.warmup_ratio * steps)
    scheduler = get_scheduler(trainer.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    trained = model
    if env.accelerator and not is_sharded(model):
        # The engine wraps the model (DDP, or DeepSpeed ZeRO-1/2 if `accelerate config` selects it)
        # and the optimizer. The scheduler stays plain: it steps once per optimizer step, as with
        # one process (accelerate's wrapper would step it once per process).
        trained, optimizer = env.accelerator.prepare(model, optimizer)
    backward = built.engine.backward(
        trained,
        training_passes(built, trained, training, env, -(-trainer.batch_size // env.rank_world[1])),
        env.accelerator,
    )
    signals = StopSignals()
    when = Keep(trainer.checkpoint_every, trainer.keep_checkpoints, lambda: signals.received)
    store = ShardedState(model, optimizer) if is_sharded(model) else WholeState(model, optimizer, env.rank_world[0])
    average = Average(model, trainer.ema) if trainer.ema else None
    if average is not None:
        best.view = average.applied  # validation, and the best epoch's weights kept, are the average's
    checkpointer = Checkpointer(env.out, store, scheduler, best, backward, when, env.precision, average)
    progress = checkpointer.restore(env.checkpoint) if env.checkpoint is not None else None
    if progress is not None:
        log.info("resuming from %s at step %d", env.checkpoint, progress.step)
        env.earlier = progress.wall_seconds
    log_loss = LogLoss(logger.log, scheduler, trainer.log_every, steps, progress.step if progress else 0, env.main)
    validating = [best] if trainer.val_every_epoch and best.evaluate else []
    clock = WallClock(env.wall)  # after validation, before the checkpointer saves the progress
    callbacks = [log_loss, *([average] if average else []), *validating, clock, checkpointer]
    plan = Plan(steps, trainer.batch_size, trainer.grad_accum, trainer.max_grad_norm, env.seed)
    with signals:
        try:
            progress = train(trained, backward, optimizer, scheduler, plan, callbacks, progress)
        except Interrupted:
            # Checkpointed: hand the signal on (submitit requeues on its SIGUSR2), then stop.
            signals.forward()
            raise
    best.restore()
    if average is not None and best.state is None:  # no validation kept an epoch's weights
        average.install()
    detach_head(model)  # the auxiliary head served training only
    stats = progress.summary()
    per_s = (stats["examples_per_s"], stats["tokens_per_s"])
    log.info("trained %d steps in %.0f s: %.2f examples/s, %.0f tokens/s", stats["steps"], stats["seconds"], *per_s)
    return stats


def training_passes(built: Built, trained, training: tuple, env: Env, batch_size: int) -> Passes:
    """How the training rows become passes: the task's loss over rows (at the engine's static
    shapes where it chose them, for this process's `batch_size` rows of a batch), under autocast."""
    prompts, targets, aux = training
    task = built.engine.for_training(built.task, trained, prompts, targets, batch_size)
    n = len(prompts)  # rows from n on are the auxiliary task's (Passes.kind keeps them apart)
    pad_id = built.tokenizer.pad_token_id
    # In one process too: the zero term (see loss_of) gives every weight a gradient at every step,
    # so the optimizer steps (moments, weight decay) are the same however many processes run.
    weights = list(trained_weights(built.model).values()) if aux else []

    def loss_of(rows: list[int]) -> torch.Tensor:
        # Autocast is per thread: each training stream sets its own.
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.bf16):
            if rows[0] >= n:
                loss = speaker_loss(trained, getattr(built.model, HEAD), aux, [j - n for j in rows], pad_id)
            else:
                loss = task.loss(trained, [prompts[j] for j in rows], [targets[j] for j in rows])
        # With an auxiliary task each kind of pass leaves some weights unused (the other task's
        # head); DDP exchanges gradients only once every weight has one: a zero term gives them one.
        return loss + 0.0 * sum(p.view(-1)[0] for p in weights) if weights else loss

    def shared_length(rows: list[int]) -> int:
        return 0 if rows[0] >= n else task.shared_length(trained, [prompts[j] for j in rows])

    lengths = task.lengths(prompts, targets) + (aux.lengths() if aux else [])
    return Passes(loss_of, lengths, shared_length, built.engine.max_pass_tokens, lambda j: j >= n)
