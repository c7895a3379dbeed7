"""A run directory is data, not code. Runs travel (W&B artifacts, shared folders, a colleague's
outputs/), and Hydra calls every `_target_` it meets in a config, nested ones too, so a saved
config.yaml is checked before a run is opened from it (emorec.inference.load, behind `emorec
predict` and `emorec.load`) or resumed (emorec.settings.check_resume_config):

- a `_target_` only where emorec's own config groups put one, naming what they may name there
  (the model loaders and the files they read, PEFT's adapter configs, the dataset loaders,
  torch's optimizers, the loggers); anywhere else, or anything else, is refused;
- no interpolation: a run saves its config resolved, and a resolver such as oc.env reads the
  environment (a hub name made of a token would send it to the hub);
- no remote code: `trust_remote_code` from a saved config is refused, and Hub kernels
  (`use_kernels`, code downloaded at each load) are turned off.

A key the user gives on the command line is the user's own choice and passes.
"""

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from emorec.errors import EmorecError

log = logging.getLogger(__name__)

MODEL_LOADERS = {
    "emorec.model.load_pretrained",
    "emorec.model.load_classifier",
    "emorec.model.load_gguf_from_package",
    "emorec.model.random_model",
    "emorec.glm.load_chatglm",  # the ChatGLM converter: safetensors, or .bin read with weights_only
}
# A file shipped in an installed package (an embedded model), nested in the model's loader.
PACKAGE_FILES = {"emorec.model.package_path", "emorec.model.converted_gguf"}
DATASET_LOADERS = {
    *(
        f"emorec.data.corpora.load_{name}"
        for name in ("meld", "emorynlp", "friends", "mastodon", "emocontext", "dailydialog", "m3ed", "iemocap")
    ),
    *(f"emorec.data.sentiment.load_{name}" for name in ("sst", "mosi", "chsims")),
    "emorec.data.tables.load_table",
    "emorec.data.hub.load_hf",
}
LOGGERS = {f"emorec.loggers.{name}Logger" for name in ("Null", "Wandb", "TensorBoard", "MLflow", "CSV")}


def class_in(module: str, base: str):
    """A predicate: a name `module.Class` of a subclass of module's `base` (looked up as an
    attribute of the module, never imported by name)."""

    def allowed(target: str) -> bool:
        import importlib

        prefix, _, name = target.rpartition(".")
        if prefix != module or not name.isidentifier():
            return False
        mod = importlib.import_module(module)
        cls = getattr(mod, name, None)
        return isinstance(cls, type) and issubclass(cls, getattr(mod, base))

    return allowed


# Where a saved config may hold a `_target_`, and what it may name there. The model's own
# name_or_path and tokenizer are the resolved copies of its loader's.
TARGETS = {
    "model.load": MODEL_LOADERS.__contains__,
    "model.load.name_or_path": PACKAGE_FILES.__contains__,
    "model.load.tokenizer": PACKAGE_FILES.__contains__,
    "model.name_or_path": PACKAGE_FILES.__contains__,
    "model.tokenizer": PACKAGE_FILES.__contains__,
    "adapter.peft": class_in("peft", "PeftConfig"),
    "dataset.load": DATASET_LOADERS.__contains__,
    "optimizer": class_in("torch.optim", "Optimizer"),
    "logger.*": LOGGERS.__contains__,  # each logger under its own name
}
REMOTE_CODE = "trust_remote_code"
HUB_KERNELS = "use_kernels"


def leaves(tree, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted key, value) of every leaf of a nested dict/list; list items by their index."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None:
        yield prefix[:-1], tree
        return
    for key, sub in items:
        yield from leaves(sub, f"{prefix}{key}.")


def is_given(key: str, given: Iterable[str]) -> bool:
    """Whether the user set `key` (or a node above it) on the command line."""
    return any(key == g or key.startswith(g + ".") for g in given)


def problem_with(key: str, value) -> tuple[str, str] | None:
    """(what is wrong, how to fix it) for a saved config's leaf, or None."""
    command_line = f"if you wrote it and trust it, pass {key}={value} on the command line"
    if key == "_target_" or key.endswith("._target_"):
        node = key.rpartition("._target_")[0]
        allowed = TARGETS.get(node) or TARGETS.get(node.rpartition(".")[0] + ".*")
        if allowed is None:
            return f"{key}={value} is a target where emorec puts none (it would be called)", command_line
        if not isinstance(value, str) or not allowed(value):
            return f"{key}={value} is not one of the targets emorec opens a run with there", command_line
    elif isinstance(value, str) and "${" in value:
        what = f"{key} holds an interpolation ({value}), and emorec saves configs resolved"
        return what, f"pass {key}=VALUE on the command line"
    elif key.rpartition(".")[2] == REMOTE_CODE and value:
        return f"{key}=true would run code from the model's repository", (
            "if you trust that model, pass model.trust_remote_code=true on the command line"
        )
    return None


def check_saved(saved: dict, source: Path, given: Iterable[str] = ()) -> dict:
    """`saved` (a run's config as a plain dict), made safe to open a run from: an EmorecError
    naming the first key it refuses (see the module's docstring); Hub kernels turned off. Keys
    in `given` (and below them) are the user's and pass."""
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise EmorecError(f"{source} is not a config emorec wrote (no model node); give the config.yaml of a run")
    given = list(given)
    for key, value in leaves(saved):
        if is_given(key, given):
            continue
        found = problem_with(key, value)
        if found:
            raise EmorecError(f"{source} is data, not code: {found[0]}; {found[1]}")
        if key.rpartition(".")[2] == HUB_KERNELS and value:
            node = saved
            for part in key.split(".")[:-1]:
                node = node[int(part) if isinstance(node, list) else part]
            node[HUB_KERNELS] = False
            log.warning(
                "%s sets %s=true (kernels downloaded from the Hub): off, as emorec takes no code from a "
                "run directory; pass model.use_kernels=true on the command line to use them",
                source,
                key,
            )
    return saved
