"""Configs of runs written by older code, brought up to date: one ordered list of upgrades,
used both when a run resumes (emorec.settings.check_resume_config) and when a finished run is
loaded (emorec.inference.load).

A run saves its config with the version of the code that wrote it (`config_version` in its
config.yaml); runs from before versions were saved count as version 0. Upgrade i takes a config
of version i to i + 1, filling each setting added since with the value that reproduces what the
old run did, and renaming what moved. Each also leaves an already-upgraded config as it is, so
a config of unknown age can go through all of them. A new change that adds, renames or moves a
setting (or a `_target_`) appends one function here.
"""

import copy

from emorec.errors import EmorecError

VERSION_KEY = "config_version"

# Issue 19 moved the speed switches from trainer to the fast group; switches added with the
# group were always on before it.
MOVED_TO_FAST = {
    "share_prefix": "share_prefix",
    "pack_prefix": "pack",
    "bf16_base": "bf16_base",
    "merge_adapter": "merge_adapter",
    "eval_streams": "eval_streams",
    "train_streams": "train_streams",
}


def fast_group(cfg: dict) -> None:
    """0 -> 1 (issue 19): trainer's speed switches moved to the fast group."""
    trainer = cfg.get("trainer", {})
    if any(k in trainer for k in MOVED_TO_FAST):
        fast = cfg.setdefault("fast", {})
        for old, new in MOVED_TO_FAST.items():
            if old in trainer:
                fast[new] = trainer.pop(old)
        fast.setdefault("head_at", True)
        fast.setdefault("token_batches", True)


PROMPT_LEARNING = ("peft.PrefixTuningConfig", "peft.PromptTuningConfig")
USER_TABLES = ("load_table", "load_hf")


def added_settings(cfg: dict) -> None:
    """1 -> 2 (issues 21-22): settings added, at the values that reproduce runs from before them:
    head=lm, no class balance, dialogue context before the instruction, a prompt-learning adapter
    from a random start, multi-label rows an error (dataset=csv/jsonl/hf)."""
    cfg.setdefault("head", {}).setdefault("name", "lm")
    trainer = cfg.setdefault("trainer", {})
    trainer.setdefault("balance", 0.0)
    trainer.setdefault("logit_adjust", 0.0)
    prompt = cfg.setdefault("prompt", {})
    prompt.setdefault("context_layout", "before")
    prompt.setdefault("context_after", "\nDialogue:\n{context}Sentence: {current}")  # unused with before
    adapter = cfg.get("adapter") or {}
    if (adapter.get("peft") or {}).get("_target_") in PROMPT_LEARNING:
        adapter.setdefault("init", "random")
        adapter.setdefault("init_text", None)
    dataset = cfg.get("dataset") or {}
    if str((dataset.get("load") or {}).get("_target_", "")).rsplit(".", 1)[-1] in USER_TABLES:
        dataset.setdefault("multi_label", "error")


# Issue 37 moved the dataset loaders into the emorec.data package.
SENTIMENT = ("load_sst", "load_mosi", "load_chsims")
LOADERS = {
    "emorec.tables.load_table": "emorec.data.tables.load_table",
    "emorec.tables.load_hf": "emorec.data.hub.load_hf",
}


def data_package(cfg: dict) -> None:
    """2 -> 3 (issue 37): loaders in emorec.data; PEFT's adapter input casts a switch of the fast
    group (fast.bf16_adapter_inputs), always on before."""
    load = (cfg.get("dataset") or {}).get("load") or {}
    target = str(load.get("_target_", ""))
    if target.startswith("emorec.datasets."):
        name = target.rsplit(".", 1)[-1]
        load["_target_"] = f"emorec.data.{'sentiment' if name in SENTIMENT else 'corpora'}.{name}"
    elif target in LOADERS:
        load["_target_"] = LOADERS[target]
    if "fast" in cfg:
        cfg["fast"].setdefault("bf16_adapter_inputs", True)


def early_stopping(cfg: dict) -> None:
    """3 -> 4: trainer.patience (early stopping), off before."""
    cfg.setdefault("trainer", {}).setdefault("patience", None)


def static_step(cfg: dict) -> None:
    """4 -> 5 (issue 38): the static training step and torch.compile, switches of the fast group;
    runs before them trained at each batch's own shape, eagerly."""
    if "fast" in cfg:
        fast = cfg["fast"]
        fast.setdefault("static_shapes", False)
        fast.setdefault("compile", False)
        fast.setdefault("compile_scope", "layer")
        fast.setdefault("buckets", 8)
        fast.setdefault("bucket_multiple", 8)
        fast.setdefault("fused_kernels", False)


def inferred_delimiter(cfg: dict) -> None:
    """5 -> 6 (issue 39): a csv file's delimiter, "," by default before, is inferred from its
    name when unset (.tsv: tab). An old "," stays where a data file is a .tsv (which it read
    as comma-separated) and becomes unset elsewhere, where that means ","."""
    load = (cfg.get("dataset") or {}).get("load") or {}
    if not str(load.get("_target_", "")).endswith("load_table") or load.get("delimiter") != ",":
        return
    files = load.get("data_files")
    names = list(files.values()) if isinstance(files, dict) else [files]
    if not any(str(name).lower().endswith(".tsv") for name in names):
        load["delimiter"] = None


def verified_copies(cfg: dict) -> None:
    """6 -> 7 (issue 40): dataset.verify, how a local copy with another digest is taken; a
    warning before."""
    dataset = cfg.get("dataset") or {}
    dataset.setdefault("verify", "warn")
    load = dataset.get("load") or {}
    if "sha256" in load:
        load.setdefault("verify", "warn")


def logger_names(cfg: dict) -> None:
    """7 -> 8 (issue 41): each logger under its own name in the logger node (several at once)."""
    logger = cfg.get("logger")
    if isinstance(logger, dict) and "_target_" in logger:
        name = {"WandbLogger": "wandb", "NullLogger": "none"}.get(str(logger["_target_"]).rsplit(".", 1)[-1], "logger")
        cfg["logger"] = {name: logger}


def activation_checkpointing(cfg: dict) -> None:
    """8 -> 9 (issue 42): trainer.activation_checkpointing, off before."""
    cfg.setdefault("trainer", {}).setdefault("activation_checkpointing", False)


def strategy(cfg: dict) -> None:
    """9 -> 10 (issue 42): trainer.strategy, data parallel before."""
    cfg.setdefault("trainer", {}).setdefault("strategy", "data_parallel")


def speaker_template(cfg: dict) -> None:
    """10 -> 11 (issue 43): prompt.speaker_template and retrieved demonstrations, off before."""
    prompt = cfg.setdefault("prompt", {})
    prompt.setdefault("speaker_template", None)
    for key, value in DEMONSTRATIONS.items():
        prompt.setdefault(key, value)


def auxiliary_tasks(cfg: dict) -> None:
    """11 -> 12 (issue 43): trainer.aux, none before."""
    trainer = cfg.setdefault("trainer", {})
    trainer.setdefault("aux", [])
    trainer.setdefault("aux_ratio", 0.25)
    cfg.setdefault("prompt", {}).setdefault("speaker_question", "Which of {labels} says this sentence: {text}")


def weight_average(cfg: dict) -> None:
    """12 -> 13 (issue 43): trainer.ema, the trained weights' moving average, off before."""
    cfg.setdefault("trainer", {}).setdefault("ema", 0.0)


def label_smoothing(cfg: dict) -> None:
    """13 -> 14 (issue 43): trainer.label_smoothing, off before."""
    cfg.setdefault("trainer", {}).setdefault("label_smoothing", 0.0)


DEMONSTRATIONS = {
    "demonstrations": 0,
    "demonstrations_by": "similar",
    "demonstration": "{text} => {label}",
    "demonstrations_layout": "\nExamples:\n{demonstrations}\nNow: {text}",
    "demonstrations_encoder": None,
}


UPGRADES = [
    fast_group,
    added_settings,
    data_package,
    early_stopping,
    static_step,
    inferred_delimiter,
    verified_copies,
    logger_names,
    activation_checkpointing,
    strategy,
    speaker_template,
    auxiliary_tasks,
    weight_average,
    label_smoothing,
]
VERSION = len(UPGRADES)


def upgrade(saved: dict) -> dict:
    """A saved config (a plain dict, its `config_version` read and dropped) as this code writes
    it."""
    cfg = copy.deepcopy(saved)
    version = cfg.pop(VERSION_KEY, 0)
    if not isinstance(version, int) or version > VERSION:
        raise EmorecError(
            f"this run's config has {VERSION_KEY}={version!r}, and this emorec reads up to {VERSION}: "
            "a newer emorec wrote it; upgrade emorec to load or resume it"
        )
    for step in UPGRADES[version:]:
        step(cfg)
    return cfg


def versioned(cfg: dict) -> dict:
    """The config to save with a run: this code's version stamped on it."""
    return {**cfg, VERSION_KEY: VERSION}
