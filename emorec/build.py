"""The builder: config -> model, tokenizer, engine and task, the same for a run (emorec.run)
and for a finished run applied to new text (emorec.inference), so a change to how a model is
built has one place to go. Also the prompts of a list of examples, and the optimizer.

Order: the per-device load plan (emorec.fast.plan_load), the model (its classification head and
adapter), the engine (emorec.fast.dispatch), the task (emorec.tasks).
"""

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel, get_peft_model

from emorec.adapters import init_from_text, prepare
from emorec.classifier import decoder_classifier, head_parameters
from emorec.env import Env
from emorec.errors import EmorecError, instantiate
from emorec.fast import Engine, Fast, LoadPlan, apply_input_casts, dispatch, optimizer_options, plan_load
from emorec.model import base_fingerprint, check_base
from emorec.prompt import Context, PromptFormat, encode_answers, encode_prompts, join_labels, scoring_answers
from emorec.reference import first_tokens_differ
from emorec.settings import is_encoder
from emorec.sharded import shard
from emorec.tasks import Balance, LabelHead, LabelWords, SequenceClassifier, Task
from emorec.tensors import base_of, is_quantized

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Spec:
    """The config groups that say what to build."""

    model: DictConfig
    adapter: DictConfig
    head: DictConfig
    prompt: DictConfig
    trainer: DictConfig
    fast: Fast

    @classmethod
    def of(cls, cfg: DictConfig) -> "Spec":
        return cls(cfg.model, cfg.adapter, cfg.head, cfg.prompt, cfg.trainer, Fast(**cfg.fast))

    @property
    def full(self) -> bool:
        """Every weight trains (adapter=full): no PEFT adapter, and the base not frozen."""
        return bool(self.adapter.train and self.adapter.peft is None)

    @property
    def kind(self) -> str:
        """lm (label words), classifier (a decoder's head) or encoder."""
        return "encoder" if is_encoder(self.model) else self.head.name


@dataclass
class Built:
    model: torch.nn.Module
    tokenizer: object
    engine: Engine
    task: Task
    load_seconds: float
    fingerprint: dict  # of the base model, saved with an adapter (emorec.model.base_fingerprint)


def build(spec: Spec, env: Env, labels: list[str], balance: Balance, saved: Path | None = None) -> Built:
    """The model with its head and adapter on env.device, and what serves it. `saved`: a
    finished run's adapter folder (or, for adapter=full, its model folder) to load, frozen,
    instead of a new adapter."""
    plan = plan_load(spec.fast, env.device, env.bf16, trains_base=spec.full or is_encoder(spec.model))
    sharding = spec.trainer.get("strategy") == "fsdp" and saved is None
    # Sharded, the model loads in host memory and each layer's shard then goes to the GPU
    # (emorec.sharded.shard): a model larger than one GPU never lands whole on one.
    model, tokenizer, load_seconds = build_model(
        spec, replace(plan, device=torch.device("cpu")) if sharding else plan, labels, saved
    )
    fingerprint = base_fingerprint(model)  # read before sharding, which slices the embeddings
    if sharding:
        model = shard(model, env.device, env.bf16, spec.model.name)
    engine = dispatch(model, spec.fast, env.device, spec.trainer.max_pass_tokens, env.rank_world[1])
    task = build_task(tokenizer, spec, labels, engine, balance)
    engine = engine.for_task(task)
    engine.chosen.update(plan.describe())
    log.info("speed components: %s", engine.chosen)
    return Built(model, tokenizer, engine, task, load_seconds, fingerprint)


def build_model(spec: Spec, plan: LoadPlan, labels: list[str], saved: Path | None):
    """(model with its head and adapter on its device, tokenizer, load seconds). Without an
    adapter (adapter=full) the whole model trains; otherwise the base is frozen."""
    start = time.perf_counter()
    adapter, encoder, full = spec.adapter, is_encoder(spec.model), spec.full
    decoder_head = spec.kind == "classifier"
    whole = full and saved is not None  # a fine-tuned whole model to load, head and all
    load = saved_model(saved, encoder or decoder_head, spec.model.load) if whole else spec.model.load
    options = {"dtype": plan.dtype, "device": plan.device}
    if encoder or (whole and decoder_head):
        options["labels"] = list(labels)
    if "attn_implementation" in load:
        options["attn_implementation"] = plan.attention(spec.model.load.attn_implementation)
    model, tokenizer = instantiate(load, **options)
    load_seconds = time.perf_counter() - start
    if saved and not whole:
        check_base(model, saved, spec.model.name)
    if decoder_head and not whole:
        # Only a head started from the label words needs their first tokens (and needs them distinct).
        first = label_tokens(tokenizer, spec.prompt, labels) if spec.head.init == "labels" else None
        model = decoder_classifier(model, labels, tokenizer.pad_token_id, spec.head.init, first)
    # A 4/8-bit base (QLoRA) stays as loaded: its norms and embeddings in the compute dtype
    # (PEFT's prepare_model_for_kbit_training would copy them to fp32, 2 GB at 8 B; RMSNorm
    # computes in fp32 anyway), and never trained whole (settings refuse adapter=full on it).
    model.requires_grad_(full and saved is None)
    if adapter.peft is not None:
        model = add_adapter(model, adapter, decoder_head, spec.model.name, saved)
        apply_input_casts(model, plan)
        if adapter.get("init") == "text" and not saved:
            prompt = spec.prompt
            text = adapter.init_text or prompt.template.format(labels=join_labels(labels), text="").strip()
            init_from_text(model, tokenizer(text, add_special_tokens=False)["input_ids"])
    if spec.trainer.get("activation_checkpointing") and (full or adapter.peft is not None) and saved is None:
        checkpoint_activations(model, spec.model.name)
    if not is_quantized(model):  # bitsandbytes placed a quantised base, which cannot move
        model.to(plan.device)  # the weights came there; a prompt-learning adapter's new ones may not have
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    share = 100 * trainable / total
    log.info(
        "model %s loaded in %.1f s; %d trainable parameters (%.3f%%)", spec.model.name, load_seconds, trainable, share
    )
    return model, tokenizer, load_seconds


def checkpoint_activations(model, name: str) -> None:
    """Each layer's activations recomputed in the backward pass (transformers' gradient
    checkpointing, in training mode only). Non-reentrant: the recomputation sees the layer's
    own inputs and RNG state, so a frozen base needs no input that requires grad, and dropout
    draws the same masks."""
    base = base_of(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise EmorecError(
            f"model {name} does not support activation checkpointing; set trainer.activation_checkpointing=false"
        )
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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


def add_adapter(model, adapter: DictConfig, decoder_head: bool, model_name: str, saved: Path | None):
    """The model under its PEFT adapter (its base frozen): a new one, or the one saved in `saved`."""
    try:
        if saved:
            return PeftModel.from_pretrained(model, saved)
        return get_peft_model(model, prepare(instantiate(adapter.peft), adapter.get("init"), decoder_head))
    except ValueError as e:
        raise EmorecError(
            f"adapter={adapter.name} does not fit model {model_name} ({str(e).splitlines()[0]}); "
            "check adapter.target_modules (or model.lora_target_modules) against the model's module names"
        ) from None


def build_task(tokenizer, spec: Spec, labels: list[str], engine: Engine, balance: Balance) -> Task:
    """The task of the spec's kind of model: lm (label words), classifier (a decoder's head) or
    encoder, its loss label-smoothed by trainer.label_smoothing."""
    task = task_of_kind(tokenizer, spec, labels, engine, balance)
    task.smoothing = spec.trainer.label_smoothing
    return task


def task_of_kind(tokenizer, spec: Spec, labels: list[str], engine: Engine, balance: Balance) -> Task:
    if spec.kind == "encoder":
        return SequenceClassifier(tokenizer.pad_token_id, balance)
    if spec.kind == "classifier":
        return LabelHead(labels, tokenizer.pad_token_id, engine.answers, balance)
    prompt, trainer = spec.prompt, spec.trainer
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


def prompts_of(tokenizer, spec: Spec, examples: list, labels: list[str], context_window: int) -> list[list[int]]:
    """The examples' prompts as token ids."""
    return encode_prompts(
        tokenizer, examples, prompt_format(spec.prompt), labels, spec.trainer.max_length, context_window
    )


def prompt_format(prompt: DictConfig) -> PromptFormat:
    """The `prompt` config node as a PromptFormat."""
    context = Context(prompt.context, prompt.context_layout, prompt.context_after)
    fmt = PromptFormat(prompt.template, prompt.system, prompt.cue, context, prompt.get("speaker_template"))
    if prompt.get("demonstrations"):
        fmt = replace(fmt, demonstration=prompt.demonstration, demonstrations_layout=prompt.demonstrations_layout)
    return fmt


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
