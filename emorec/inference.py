"""A finished run applied to new text: `emorec.load(run_dir)` (and `emorec predict RUN_DIR`,
emorec.predict_cli).

Everything comes from the run's own directory: its config.yaml (model, head, prompt, scoring,
speed components; brought up to date by emorec.upgrade), its saved adapter (or whole model) and
its labels. The model is built by the same builder the run used (emorec.build) and predicts
through the same path as the run's evaluation (emorec.evaluate), so the same texts get the same
labels and probabilities.
"""

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from emorec.build import Built, Spec, build, prompts_of
from emorec.data.records import Example, normalise_text
from emorec.env import Env, resolve_device
from emorec.errors import EmorecError
from emorec.evaluate import predict
from emorec.fast import use_bf16
from emorec.tasks import Balance
from emorec.trust import check_saved, problem_with
from emorec.upgrade import upgrade

Turn = str | tuple[str | None, str]  # an earlier utterance, or (speaker, utterance)


@dataclass
class Trained:
    """A run's trained model, ready to label text as the run's evaluation did."""

    config: DictConfig
    labels: list[str]
    built: Built
    env: Env

    @property
    def model(self):
        return self.built.model

    @property
    def tokenizer(self):
        return self.built.tokenizer

    def predict(
        self,
        texts: list[str],
        context: list[list[Turn]] | None = None,
        speakers: list[str | None] | None = None,
        batch_size: int | None = None,
    ) -> list[dict]:
        """One dict per text: its label ("INVALID" when a generated answer names none), and the
        probability of each label (`probs`) or the generated answer (`generated`). With the run's
        dataset.context_window > 0, `context[i]` holds the turns before text i, oldest first,
        each an utterance or (speaker, utterance); `speakers[i]` is text i's speaker."""
        if not texts:
            raise EmorecError("no texts to label; give at least one")
        if isinstance(texts, str):
            raise EmorecError("predict takes a list of texts; wrap a single text in a list")
        examples = [
            Example(
                str(i),
                normalise_text(text or ""),
                0,
                speakers[i] if speakers else None,
                context=tuple(_turn(t) for t in context[i]) if context else (),
            )
            for i, text in enumerate(texts)
        ]
        empty = next((i for i, ex in enumerate(examples) if not ex.text), None)
        if empty is not None:
            raise EmorecError(f"text {empty} is empty; give each row some text")
        spec, built = Spec.of(self.config), self.built
        ids = prompts_of(built.tokenizer, spec, examples, self.labels, self.config.dataset.context_window)
        batch_size = batch_size or self.config.trainer.eval_batch_size
        result = predict(
            built.model, built.task, ids, built.engine, batch_size=batch_size, autocast=self.env.bf16, desc="predict"
        )
        out = []
        for text, pred, extra in zip(texts, result["preds"], result["extra"]):
            row = {"text": text, "label": self.labels[pred] if pred >= 0 else "INVALID"}
            if isinstance(extra, str):
                row["generated"] = extra
            else:
                row["probs"] = dict(zip(self.labels, extra))
            out.append(row)
        return out


def _turn(turn) -> tuple[str | None, str]:
    if isinstance(turn, str):
        return (None, normalise_text(turn))
    speaker, text = turn
    return (speaker, normalise_text(text))


def load(run_dir: str | Path, device: str = "auto", overrides: list[str] = ()) -> Trained:
    """A finished run's model (see Trained). `overrides` (key=value) change the run's saved
    config, e.g. model.name_or_path=PATH where its base model has moved."""
    run = Path(run_dir).expanduser()
    return load_opened(run, *open_run(run, overrides), device)


def open_run(run: Path, overrides: list[str] = ()) -> tuple[DictConfig, dict]:
    """(the run's config, as data and with `overrides`; its metrics.json, {} without one),
    read before any model loads."""
    if not (run / "config.yaml").is_file():
        raise EmorecError(
            f"{run} is not an emorec run (no config.yaml); give the directory a run wrote (its hydra.run.dir)"
        )
    return opened_config(run / "config.yaml", list(overrides)), run_metrics(run / "metrics.json")


def load_opened(run: Path, cfg: DictConfig, metrics: dict, device: str = "auto") -> Trained:
    """The model of a run opened by open_run."""
    labels = list(cfg.dataset.labels or metrics.get("data", {}).get("labels") or [])
    if not all(isinstance(label, str) and label for label in labels):
        raise EmorecError(f"{run}: the run's labels are not a list of names; give the directory a run wrote")
    if not labels:
        raise EmorecError(f"{run} has no metrics.json to read its inferred labels from; the run did not finish")
    if cfg.prompt.get("demonstrations"):
        raise EmorecError(
            f"{run} shows each prompt demonstrations retrieved from its training set (prompt.demonstrations="
            f"{cfg.prompt.demonstrations}), which labelling new text does not retrieve yet; use a run without them"
        )
    saved = _weights(run, cfg)
    where = resolve_device(device)
    env = Env(run, cfg.seed, where, use_bf16(cfg.trainer.precision, where))
    built = build(Spec.of(cfg), env, labels, _balance(cfg, labels, metrics, run), saved)
    return Trained(cfg, labels, built, env)


def run_metrics(path: Path) -> dict:
    """A run's metrics.json ({} where the run did not write one), as data."""
    if not path.is_file():
        return {}
    try:
        metrics = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise EmorecError(f"{path} cannot be read ({type(e).__name__}); give the directory a run wrote") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("data", {}), dict):
        raise EmorecError(f"{path} is not a run's metrics.json; give the directory a run wrote")
    return metrics


def opened_config(path: Path, overrides: list[str]) -> DictConfig:
    """A run's saved config as data (emorec.trust), brought up to date (a run from before a
    setting existed ran as its old value), with the user's `overrides` (key=value) merged in."""
    try:
        saved = OmegaConf.to_container(OmegaConf.load(path))
        saved = upgrade(saved) if isinstance(saved, dict) else saved
    except EmorecError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a damaged file raises, the answer is the same
        raise EmorecError(f"{path} cannot be read ({type(e).__name__}); give the config.yaml a run wrote") from None
    # The saved config is resolved: model.K (name_or_path, trust_remote_code, ...) was copied
    # into model.load, so a command-line model.K goes there too.
    load = (saved.get("model") or {}).get("load") if isinstance(saved, dict) else None
    bad = next((o for o in overrides if "=" not in o), None)
    if bad is not None:
        raise EmorecError(f"{bad!r} is not an override; write key=value, e.g. model.name_or_path=PATH")
    keys = dict(o.split("=", 1) for o in overrides)
    if isinstance(load, dict):
        keys.update({f"model.load.{k[6:]}": v for k, v in keys.items() if k.startswith("model.") and k[6:] in load})
    cfg = OmegaConf.create(check_saved(saved, path, list(keys)))
    if keys:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in keys.items()]))
    return cfg


def _weights(run: Path, cfg: DictConfig) -> Path | None:
    """The run's saved adapter folder (or, for adapter=full, model folder); None when the run
    trained nothing (a zero-shot run predicts with the base as it is)."""
    if not cfg.adapter.train:
        return None
    folder = run / ("model" if cfg.adapter.peft is None else "adapter")
    if not folder.is_dir():
        overrides = run / ".hydra" / "overrides.yaml"
        given = OmegaConf.load(overrides) if overrides.is_file() else []
        # A command to copy and paste: quoted, and only overrides that the checks of a run
        # directory's config would pass (emorec.trust).
        keep = [str(o) for o in given if not str(o).startswith(("resume=", "hydra.run.dir="))]
        keep = [o for o in keep if "=" in o and not problem_with(*_parsed(o))]
        words = ["python -m emorec", *map(shlex.quote, keep), shlex.quote(f"hydra.run.dir={run}"), "resume=true"]
        command = " ".join(words)
        raise EmorecError(f"{run} has no saved {folder.name}/: the run did not finish; finish it with: {command}")
    if folder.name == "adapter" and not (folder / "adapter_model.safetensors").is_file():
        raise EmorecError(
            f"{folder} has no adapter_model.safetensors; emorec reads saved weights from safetensors only "
            "(a pickled .bin can run code): give the adapter folder the run wrote"
        )
    return folder


def _parsed(override: str) -> tuple[str, object]:
    """An override's key and its value as YAML reads it (true, 3, a string)."""
    key, value = override.split("=", 1)
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        return key, value


def _balance(cfg: DictConfig, labels: list[str], metrics: dict, run: Path) -> Balance:
    """The run's prediction-time logit adjustment (trainer.logit_adjust), from its train counts."""
    if not cfg.trainer.logit_adjust:
        return Balance()
    counts = metrics.get("data", {}).get("train_counts")
    if counts is None:
        raise EmorecError(f"{run} has no metrics.json with train_counts, which trainer.logit_adjust needs")
    targets = [i for i, label in enumerate(labels) for _ in range(counts.get(label, 0))]
    return Balance.of(targets, len(labels), 0.0, cfg.trainer.logit_adjust)
