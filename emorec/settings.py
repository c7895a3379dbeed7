"""Validation of a run's settings, in one place: types and ranges, the prompt's fields, the
device and the metric before anything loads; the labels' settings once the data has them; a
resumed run's config against the one it started with."""

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from emorec.errors import EmorecError
from emorec.metrics import METRICS
from emorec.model import is_local, quantization_config


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
            "fast.eval_streams",
            "fast.train_streams",
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
            "dataset.max_train",
            "dataset.max_eval",
        )
    ],
    *[
        (key, lambda v: _int(v) and v >= 0, "an integer >= 0")
        for key in ("trainer.checkpoint_every", "dataset.context_window", "seed")
    ],
    (
        "trainer.max_pass_tokens",
        lambda v: v is None or v == "auto" or (_int(v) and v > 0),
        "auto, a positive integer or null",
    ),
    ("optimizer.lr", lambda v: _num(v) and v > 0, "a number > 0"),
    ("head.lr", lambda v: v is None or (_num(v) and v > 0), "a number > 0 or null"),
    ("head.init", lambda v: v in ("labels", "random"), "labels or random"),
    ("trainer.balance", lambda v: _num(v) and v >= 0, "a number >= 0"),
    ("trainer.logit_adjust", lambda v: _num(v) and v >= 0, "a number >= 0"),
    ("prompt.context_layout", lambda v: v in ("before", "after"), "before or after"),
    ("adapter.alpha", lambda v: _num(v) and v > 0, "a number > 0"),
    ("adapter.dropout", lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("trainer.warmup_ratio", lambda v: _num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    ("trainer.max_grad_norm", lambda v: v is None or (_num(v) and v > 0), "a number > 0 or null"),
    ("trainer.predict", lambda v: v in ("score", "generate"), "score or generate"),
    ("trainer.scoring", lambda v: v in ("auto", "answer", "first_token"), "auto, answer or first_token"),
    ("trainer.precision", lambda v: v in ("auto", "bf16", "fp32"), "auto, bf16 or fp32"),
    *[
        (f"fast.{key}", lambda v: isinstance(v, bool), "true or false")
        for key in ("share_prefix", "pack", "head_at", "bf16_base", "merge_adapter", "token_batches")
    ],
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
    source = OmegaConf.select(cfg, "model.load.name_or_path")
    if isinstance(source, str):  # a folder that is not there says so now, not after the data loads
        is_local(source)
    check_metric(cfg.dataset.metric, cfg.dataset.neutral_label)
    if cfg.dataset.labels is not None:
        check_labels(list(cfg.dataset.labels), cfg.dataset.neutral_label)
    check_head(cfg)
    check_adapter_init(cfg.adapter)
    for key, fields in TEMPLATES:
        check_template(key, OmegaConf.select(cfg, key), fields)
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
    quantized = OmegaConf.select(cfg, "model.quantization", default=None)
    if quantized and cfg.adapter.train and cfg.adapter.peft is None:
        raise EmorecError(
            f"adapter={cfg.adapter.name} trains every weight, and a {quantized} base cannot train; "
            "use a PEFT adapter (adapter=lora: QLoRA) or model.quantization=null"
        )
    quantization_config(quantized)  # bitsandbytes and a GPU


# The prompt's templates and the fields each may use.
TEMPLATES = [
    ("prompt.template", ("labels", "text")),
    ("prompt.context", ("context",)),
    ("prompt.context_after", ("context", "current")),
]


def check_template(key: str, template: str, fields: tuple[str, ...]) -> None:
    try:
        template.format(**dict.fromkeys(fields, ""))
    except (KeyError, IndexError, ValueError) as e:
        use = " and ".join(f"{{{f}}}" for f in fields)
        raise EmorecError(f"{key} has an unknown field or a stray brace ({e}); use only {use}") from None


# Settings a resumed run may change: they do not change what is computed.
RESUME_MAY_CHANGE = {"resume", "output_dir", "logger", "trainer.checkpoint_every", "trainer.keep_checkpoints"}
RESUME_MAY_CHANGE |= {"trainer.num_threads", "dataset.data_dir", "sweep_name"}
# A batch split into passes gives the same update (batches.passes): memory only.
RESUME_MAY_CHANGE |= {"trainer.max_pass_tokens"}
# The same attention by another kernel (auto chooses eager on a CPU, as runs before auto did).
RESUME_MAY_CHANGE |= {"model.attn_implementation", "model.load.attn_implementation"}

# Settings added since issue 21, at the values that reproduce runs from before them: a run
# checkpointed then resumes, or is told which to set.
ADDED_SINCE = {
    "head.name": "lm",
    "trainer.balance": 0.0,
    "trainer.logit_adjust": 0.0,
    "prompt.context_layout": "before",
    "prompt.context_after": "\nDialogue:\n{context}Sentence: {current}",  # unused with before
    "adapter.init": "random",
    "adapter.init_text": None,
    "dataset.multi_label": "error",  # issue 22 (dataset=csv/jsonl: their file and column keys changed then)
}


# Settings that moved from trainer to the fast group (issue 19): a run checkpointed before the
# move resumes with the same settings under their new names. Switches added with the group were
# always on then.
MOVED = {
    "trainer.share_prefix": "fast.share_prefix",
    "trainer.pack_prefix": "fast.pack",
    "trainer.bf16_base": "fast.bf16_base",
    "trainer.merge_adapter": "fast.merge_adapter",
    "trainer.eval_streams": "fast.eval_streams",
    "trainer.train_streams": "fast.train_streams",
}
ADDED_WITH_FAST = {"fast.head_at": True, "fast.token_batches": True}


def check_resume_config(cfg: DictConfig, checkpoint: Path) -> None:
    """A run continues only with the config it started with: anything else would silently mix
    two experiments."""
    saved_path = checkpoint.parent.parent / "config.yaml"
    if not saved_path.is_file():
        return
    saved = flatten(OmegaConf.to_container(OmegaConf.load(saved_path), resolve=False))
    if any(k in saved for k in MOVED):
        saved = {MOVED.get(k, k): v for k, v in saved.items()} | ADDED_WITH_FAST
    now = flatten(OmegaConf.to_container(cfg, resolve=True))
    saved = {k: v for k, v in ADDED_SINCE.items() if k in now} | saved
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


def is_encoder(model_cfg: DictConfig) -> bool:
    """An encoder (model.task_type=SEQ_CLS, e.g. model=minilm_l6) loads as a sequence classifier
    with a new head over the labels; a decoder loads as a causal LM (and head=classifier makes it
    a sequence classifier: emorec.head)."""
    return model_cfg.get("task_type", "CAUSAL_LM") == "SEQ_CLS"


def check_head(cfg: DictConfig) -> None:
    classifier = cfg.head.name == "classifier"
    if is_encoder(cfg.model) and not classifier:
        raise EmorecError(f"model={cfg.model.name} is an encoder and has no LM head; use head=classifier")
    if classifier and cfg.trainer.predict == "generate":
        raise EmorecError("head=classifier predicts with its head and cannot generate; use trainer.predict=score")
    if cfg.trainer.logit_adjust and cfg.trainer.predict == "generate":
        raise EmorecError(
            "trainer.logit_adjust adjusts label scores, and generation has none; use trainer.predict=score"
        )


# adapter.init: the choices each adapter offers.
ADAPTER_INITS = {"ptuning_v2": ("random", "zero", "text"), "prompt_tuning": ("random", "vocab", "text")}


def check_adapter_init(adapter: DictConfig) -> None:
    init = adapter.get("init")
    if init is None:
        return
    kind = adapter.peft.get("_target_", "").rsplit(".", 1)[-1] if adapter.get("peft") else None
    choices = {"PrefixTuningConfig": ADAPTER_INITS["ptuning_v2"], "PromptTuningConfig": ADAPTER_INITS["prompt_tuning"]}
    if init not in choices.get(kind, (init,)):
        raise EmorecError(f"adapter.init={init!r} is not valid for adapter={adapter.name}; use one of {choices[kind]}")
    if init == "text" and adapter.get("prefix_projection"):
        raise EmorecError(
            "adapter.init=text sets the prefix's keys and values, which prefix_projection=true computes; "
            "with the projection use adapter.init=zero or random"
        )


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
