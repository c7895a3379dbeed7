"""Validation of a run's settings: each group's own (its schema, emorec.schema), then the checks
that span groups, the prompt's fields, the device and the metric, before anything loads; the
labels' settings once the data has them; a resumed run's config against the one it started with
(brought up to date first, emorec.upgrade)."""

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from emorec.errors import EmorecError
from emorec.model import is_local, quantization_config
from emorec.schema import validate
from emorec.trust import check_saved
from emorec.upgrade import upgrade


def check_config(cfg: DictConfig) -> None:
    """The settings before any data or model loads: each group's ranges (its schema, checked by
    emorec.schema.validate; Hydra checked the types), then what spans groups."""
    tree = flatten(OmegaConf.to_container(cfg, resolve=False))
    missing = [k for k, v in tree.items() if v == "???" and not k.startswith("hydra")]
    if missing:
        raise EmorecError(f"{missing[0]} is required and has no value; set it with {missing[0]}=...")
    seed = cfg.seed
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        raise EmorecError(f"seed={seed!r} is not valid; it must be an integer >= 0")
    if not isinstance(cfg.resume, bool | str):
        raise EmorecError(f"resume={cfg.resume!r} is not valid; it must be true, false or a run directory")
    validate(cfg)
    source = OmegaConf.select(cfg, "model.load.name_or_path")
    if isinstance(source, str):  # a folder that is not there says so now, not after the data loads
        is_local(source)
    check_head(cfg)
    for key, fields in TEMPLATES:
        if (template := OmegaConf.select(cfg, key)) is not None:
            check_template(key, template, fields)
    for key in ("prompt.template", "prompt.speaker_template"):
        if "{text}" not in (OmegaConf.select(cfg, key) or "{text}"):
            raise EmorecError(f"{key} has no {{text}} field; the utterance would not reach the model")
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
    if cfg.trainer.strategy == "fsdp" and cfg.trainer.predict == "generate":
        raise EmorecError(
            "trainer.strategy=fsdp predicts by scoring the labels (generation runs a different number of "
            "forwards in each process); use trainer.predict=score, or trainer.strategy=data_parallel"
        )
    if cfg.trainer.aux and is_encoder(cfg.model):
        raise EmorecError("trainer.aux trains a decoder's hidden states; drop trainer.aux for an encoder model")
    if cfg.trainer.aux and cfg.trainer.strategy == "fsdp":
        raise EmorecError(
            "trainer.aux is not supported under trainer.strategy=fsdp yet (its passes differ between processes); "
            "drop trainer.aux or use trainer.strategy=data_parallel"
        )
    peft = cfg.adapter.peft
    if cfg.trainer.activation_checkpointing and peft is not None and str(peft._target_).endswith("PrefixTuningConfig"):
        raise EmorecError(
            f"adapter={cfg.adapter.name} passes its prefix as a key/value cache, which a layer recomputed in the "
            "backward pass finds already extended; set trainer.activation_checkpointing=false"
        )


# The prompt's templates and the fields each may use.
TEMPLATES = [
    ("prompt.template", ("labels", "text")),
    ("prompt.speaker_template", ("labels", "speaker", "text")),
    ("prompt.speaker_question", ("labels", "text")),
    ("prompt.demonstration", ("text", "label")),
    ("prompt.demonstrations_layout", ("demonstrations", "text")),
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
# The same loss at other shapes, compiled or not, with other kernels (emorec.fast.static): the
# same computation up to rounding, so a run from before them resumes under today's defaults.
RESUME_MAY_CHANGE |= {f"fast.{k}" for k in ("static_shapes", "compile", "compile_scope", "buckets", "bucket_multiple")}
RESUME_MAY_CHANGE |= {"fast.fused_kernels"}
# Activations kept or recomputed: the same gradients, other memory.
RESUME_MAY_CHANGE |= {"trainer.activation_checkpointing"}
# Where the files come from and how they are checked (DailyDialog's archive: its URLs and digest).
RESUME_MAY_CHANGE |= {"dataset.verify", "dataset.load.verify", "dataset.load.archive", "dataset.load.sha256"}


def check_resume_config(cfg: DictConfig, checkpoint: Path) -> None:
    """A run continues only with the config it started with: anything else would silently mix
    two experiments."""
    saved_path = checkpoint.parent.parent / "config.yaml"
    if not saved_path.is_file():
        return
    tree = upgrade(OmegaConf.to_container(OmegaConf.load(saved_path), resolve=False))
    now = flatten(OmegaConf.to_container(cfg, resolve=True))
    # The checkpoint's run directory may not be this user's (a shared folder, resume=<path>):
    # what its config holds beyond the config given now is checked as data (emorec.trust), so
    # the error below never asks to copy a target or remote code from it.
    saved = flatten(check_saved(tree, saved_path, [k for k, v in flatten(tree).items() if now.get(k) == v]))
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
    a sequence classifier: emorec.classifier)."""
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
