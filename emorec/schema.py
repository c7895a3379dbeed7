"""The config groups' schemas: one dataclass per group (per kind, for adapters), registered in
Hydra's ConfigStore under `schema/` and extended by every YAML option of the group
(`defaults: [/schema/<name>@_here_, _self_]`). Hydra checks the types as it composes; each
dataclass checks its ranges in __post_init__ (`validate` builds them); only the checks that
span groups are written by hand (emorec.settings).

The model and logger groups stay open: their nodes are the arguments of the loader or logger
they name (`_target_`), whose signature is their schema.
"""

import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ValidationError

from emorec.auxiliary import TASKS
from emorec.errors import EmorecError
from emorec.fast import Fast
from emorec.metrics import METRICS


def invalid(key: str, value, what: str) -> EmorecError:
    return EmorecError(f"{key}={value!r} is not valid; it must be {what}")


class Checked:
    """Range checks on construction: `check(name, ok, what)` for each field that needs one."""

    GROUP: ClassVar[str]

    def check(self, name: str, ok, what: str) -> None:
        value = getattr(self, name)
        if not ok(value):
            raise invalid(f"{self.GROUP}.{name}", value, what)

    def positive(self, *names: str, optional: bool = False) -> None:
        for name in names:
            ok = (lambda v: v is None or v > 0) if optional else (lambda v: v > 0)
            self.check(name, ok, "a positive integer or null" if optional else "a positive integer")

    def one_of(self, name: str, *choices) -> None:
        what = ", ".join(map(str, choices[:-1])) + f" or {choices[-1]}"
        self.check(name, lambda v: v in choices, what)


@dataclass
class Trainer(Checked):
    """How a run trains and predicts (conf/trainer/)."""

    GROUP: ClassVar[str] = "trainer"
    epochs: int
    max_steps: int | None
    batch_size: int
    grad_accum: int
    max_pass_tokens: Any  # auto, a positive integer or null
    eval_batch_size: int
    scheduler: str  # a transformers.get_scheduler name
    warmup_ratio: float
    max_grad_norm: float | None
    precision: str
    device: str
    num_threads: int | None
    max_length: int
    predict: str
    scoring: str
    balance: float
    logit_adjust: float
    val_every_epoch: bool
    patience: int | None
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int
    activation_checkpointing: bool = False
    strategy: str = "data_parallel"
    aux: list[str] = field(default_factory=list)  # auxiliary training tasks (emorec.auxiliary)
    aux_ratio: float = 0.25
    ema: float = 0.0  # decay of the trained weights' moving average (emorec.callbacks.Average); 0: off
    label_smoothing: float = 0.0  # the emotion loss's (emorec.reference.target_logp); 0: off

    def __post_init__(self):
        self.one_of("strategy", "data_parallel", "fsdp")
        for task in self.aux:
            if task not in TASKS:
                raise invalid("trainer.aux", list(self.aux), f"a list of {', '.join(TASKS)}")
        self.check("aux_ratio", lambda v: v > 0, "a number > 0")
        self.check("ema", lambda v: 0 <= v < 1, "a number in [0, 1): the average's decay per step (0: off)")
        self.check("label_smoothing", lambda v: 0 <= v < 1, "a number in [0, 1), e.g. 0.1 (0: off)")
        if self.ema and self.strategy == "fsdp":
            raise EmorecError("trainer.ema averages whole weights; with trainer.strategy=fsdp set trainer.ema=0")
        self.positive("batch_size", "eval_batch_size", "grad_accum", "epochs", "max_length", "log_every")
        self.positive("keep_checkpoints")
        self.positive("max_steps", "num_threads", "patience", optional=True)
        if self.patience and not self.val_every_epoch:
            raise EmorecError(
                "trainer.patience stops on the dev metric of each epoch; set trainer.val_every_epoch=true"
            )
        self.check("checkpoint_every", lambda v: v >= 0, "an integer >= 0")
        tokens = self.max_pass_tokens
        whole = isinstance(tokens, int) and not isinstance(tokens, bool)
        if not (tokens is None or tokens == "auto" or (whole and tokens > 0)):
            raise invalid("trainer.max_pass_tokens", tokens, "auto, a positive integer or null")
        self.check("balance", lambda v: v >= 0, "a number >= 0")
        self.check("logit_adjust", lambda v: v >= 0, "a number >= 0")
        self.check("warmup_ratio", lambda v: 0 <= v <= 1, "a number in [0, 1]")
        self.check("max_grad_norm", lambda v: v is None or v > 0, "a number > 0 or null")
        self.one_of("predict", "score", "generate")
        self.one_of("scoring", "auto", "answer", "first_token")
        self.one_of("precision", "auto", "bf16", "fp32")


@dataclass
class Head(Checked):
    """What predicts: the LM's own head (lm) or a head over the labels (classifier)."""

    GROUP: ClassVar[str] = "head"
    name: str
    init: str | None = None  # head=classifier: labels or random
    lr: float | None = None  # head=classifier: its own learning rate (null: the optimizer's)

    def __post_init__(self):
        self.one_of("name", "lm", "classifier")
        if self.name == "classifier":
            self.one_of("init", "labels", "random")
        self.check("lr", lambda v: v is None or v > 0, "a number > 0 or null")


@dataclass
class Optimizer(Checked):
    """A torch optimizer, built over the trainable parameters (`_partial_`)."""

    GROUP: ClassVar[str] = "optimizer"
    _target_: str
    _partial_: bool
    lr: float
    weight_decay: float
    betas: list[float] | None = None

    def __post_init__(self):
        self.check("lr", lambda v: v > 0, "a number > 0")
        self.check("weight_decay", lambda v: v >= 0, "a number >= 0")


@dataclass
class Dataset(Checked):
    """A dataset option: its labels, metric of record, subsets, and the loader that reads it."""

    GROUP: ClassVar[str] = "dataset"
    name: str
    labels: list[str] | None  # the prompt's label words (null: inferred from a user's data)
    metric: str  # the metric of record
    neutral_label: str | None
    context_window: int
    max_train: int | None
    max_eval: int | None
    max_dev: int | None
    load: Any  # the loader (`_target_`) and its arguments
    on_bad_row: str = "error"
    data_dir: str | None = None
    multi_label: str | None = None  # dataset=csv/jsonl/hf: error, first or drop
    # A local copy whose sha256 differs from the release's: warn, or strict (an error).
    verify: str = "warn"

    def __post_init__(self):
        self.check("context_window", lambda v: v >= 0, "an integer >= 0")
        self.positive("max_train", "max_eval", "max_dev", optional=True)
        self.one_of("on_bad_row", "error", "skip")
        self.one_of("verify", "warn", "strict")
        check_metric(self.metric, self.neutral_label)
        if self.labels is not None:
            check_labels(list(self.labels), self.neutral_label)


def check_metric(metric: str, neutral_label: str | None) -> None:
    if metric not in METRICS:
        raise EmorecError(f"dataset.metric={metric!r}; use one of {', '.join(METRICS)}")
    if metric == "micro_f1_no_neutral" and not neutral_label:
        raise EmorecError("dataset.metric=micro_f1_no_neutral needs dataset.neutral_label, the label to leave out")


def check_labels(labels: list[str], neutral_label: str | None) -> None:
    """The label settings against the labels (the config's, or those the data has)."""
    if len(set(labels)) != len(labels):
        raise EmorecError(f"dataset.labels {list(labels)} has duplicates; list each label once")
    if neutral_label and neutral_label not in labels:
        raise EmorecError(f"dataset.neutral_label={neutral_label!r} is not one of dataset.labels {list(labels)}")


@dataclass
class Prompt(Checked):
    """The prompt's wording (conf/config.yaml's `prompt` node, which model configs may fill in):
    the instruction, the answer cue without a chat template, the system turn, and how dialogue
    context is laid out (emorec.prompt.PromptFormat)."""

    GROUP: ClassVar[str] = "prompt"
    template: str
    cue: str
    system: str | None
    context_layout: str
    context_after: str
    context: str
    speaker_template: str | None = None
    demonstrations: int = 0
    demonstrations_by: str = "similar"
    demonstration: str = "{text} => {label}"
    demonstrations_layout: str = "\nExamples:\n{demonstrations}\nNow: {text}"
    demonstrations_encoder: str | None = None  # a sentence encoder's folder (null: the embedded MiniLM)
    speaker_question: str = "Which of {labels} says this sentence: {text}"  # trainer.aux=[speaker]

    def __post_init__(self):
        self.one_of("context_layout", "before", "after")
        self.one_of("demonstrations_by", "similar", "label")
        self.check("demonstrations", lambda v: v >= 0, "an integer >= 0")


@dataclass
class Adapter(Checked):
    """What every adapter option has; adapter=none is just this (`peft: null`, no training)."""

    GROUP: ClassVar[str] = "adapter"
    name: str
    train: bool
    peft: Any  # a PEFT config dataclass (`_target_`), or null

    def __post_init__(self):
        pass


@dataclass
class OwnRate(Adapter):
    """An adapter with its own default learning rate (`lr`, the optimizer's default), and
    adapter=full (`peft: null`: every weight trains)."""

    lr: float = MISSING

    def __post_init__(self):
        super().__post_init__()
        self.check("lr", lambda v: v > 0, "a number > 0")


@dataclass
class Lora(Adapter):
    """LoRA and DoRA."""

    r: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING
    target_modules: Any = None

    def __post_init__(self):
        super().__post_init__()
        self.positive("r")
        self.check("alpha", lambda v: v > 0, "a number > 0")
        self.check("dropout", lambda v: 0 <= v < 1, "a number in [0, 1)")


@dataclass
class IA3(OwnRate):
    target_modules: Any = None
    feedforward_modules: Any = None


@dataclass
class PromptLearning(OwnRate):
    """P-Tuning (v1): a prompt encoder's virtual tokens at the input."""

    INITS: ClassVar[tuple[str, ...]] = ()  # how the prompt may start (adapter.init)
    num_virtual_tokens: int = MISSING
    encoder_hidden_size: int = MISSING

    def __post_init__(self):
        super().__post_init__()
        self.positive("num_virtual_tokens", "encoder_hidden_size")


def check_init(adapter) -> None:
    """adapter.init against the choices of the adapter's kind."""
    if adapter.init not in adapter.INITS:
        raise EmorecError(
            f"adapter.init={adapter.init!r} is not valid for adapter={adapter.name}; use one of {adapter.INITS}"
        )


@dataclass
class PrefixTuning(PromptLearning):
    """P-Tuning v2 (deep prompt tuning): key/value prefixes at every layer."""

    INITS: ClassVar[tuple[str, ...]] = ("random", "zero", "text")
    init: str = MISSING
    init_text: str | None = None
    prefix_projection: bool = MISSING

    def __post_init__(self):
        super().__post_init__()
        check_init(self)
        if self.init == "text" and self.prefix_projection:
            raise EmorecError(
                "adapter.init=text sets the prefix's keys and values, which prefix_projection=true computes; "
                "with the projection use adapter.init=zero or random"
            )


@dataclass
class PromptTuning(OwnRate):
    """Prompt tuning: a soft prompt at the input layer only."""

    INITS: ClassVar[tuple[str, ...]] = ("random", "vocab", "text")
    num_virtual_tokens: int = MISSING
    init: str = MISSING
    init_text: str | None = None

    def __post_init__(self):
        super().__post_init__()
        self.positive("num_virtual_tokens")
        check_init(self)


# The options' schemas, by their name under schema/ in the ConfigStore.
SCHEMAS = {
    "trainer": Trainer,
    "fast": Fast,
    "head": Head,
    "optimizer": Optimizer,
    "dataset": Dataset,
    "prompt": Prompt,
    "adapter": Adapter,
    "own_rate": OwnRate,
    "lora": Lora,
    "ia3": IA3,
    "ptuning": PromptLearning,
    "prefix_tuning": PrefixTuning,
    "prompt_tuning": PromptTuning,
}
TYPED = ("trainer", "fast", "head", "optimizer", "dataset", "prompt", "adapter")


def register() -> None:
    """The schemas into Hydra's ConfigStore, before a config is composed (emorec.__main__)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(group="schema", name=name, node=schema)


def validate(cfg) -> None:
    """Each typed node of a composed config built as its dataclass, whose __post_init__ checks
    the ranges (Hydra checked the types as it composed)."""
    for key in TYPED:
        node = cfg.get(key)
        if node is not None and is_dataclass(OmegaConf.get_type(node)):
            OmegaConf.to_object(node)


TYPES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}


def describe_type(tp) -> str:
    """What a value of type `tp` must be, in words: int | None -> "an integer or null"."""
    args = typing.get_args(tp)
    base = next((a for a in args if a is not type(None)), tp) if args and type(None) in args else tp
    what = TYPES.get(typing.get_origin(base) or base, "of another type")
    return what + (" or null" if type(None) in args else "")


def check_overrides(overrides: list[str], config_dir: str) -> None:
    """Compose the config as Hydra is about to, so that a value of the wrong type is told in one
    line, as every other bad setting is; anything else is left to Hydra to report."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            compose("config", overrides=overrides)
    except ConfigCompositionException as e:
        cause = e.__cause__
        if isinstance(cause, ValidationError) and cause.full_key and is_dataclass(cause.object_type):
            key = str(cause.full_key)
            given = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
            hint = next((f.type for f in fields(cause.object_type) if f.name == key.rsplit(".", 1)[-1]), None)
            value = yaml.safe_load(given[key]) if key in given else "?"
            raise invalid(key, value, describe_type(hint)) from None
    except Exception:  # sweeps, Hydra's own flags: Hydra reports what is wrong with those
        return
