"""A finished run applied to new text: `emorec.load(run_dir)` (and `emorec predict RUN_DIR`,
emorec.predict_cli).

Everything comes from the run's own directory: its config.yaml (model, head, prompt, scoring,
speed components; brought up to date by emorec.upgrade), its saved adapter (or whole model) and
its labels. The model is built by the same builder the run used (emorec.build) and predicts
through the same path as the run's evaluation (emorec.evaluate), so the same texts get the same
labels and probabilities.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from emorec.build import Built, Spec, build, prompts_of
from emorec.data.records import Example, normalise_text
from emorec.env import Env, resolve_device
from emorec.errors import EmorecError
from emorec.evaluate import predict
from emorec.fast import use_bf16
from emorec.tasks import Balance
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
    if not (run / "config.yaml").is_file():
        raise EmorecError(
            f"{run} is not an emorec run (no config.yaml); give the directory a run wrote (its hydra.run.dir)"
        )
    # A run from before a setting existed ran as its old value.
    cfg = OmegaConf.create(upgrade(OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))))
    # The saved config is resolved: model.name_or_path was copied into model.load, so it goes
    # there too.
    if "name_or_path" in cfg.model.load:
        overrides = [*overrides, *(f"model.load.{o[6:]}" for o in overrides if o.startswith("model.name_or_path="))]
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    labels = list(cfg.dataset.labels or metrics.get("data", {}).get("labels") or [])
    if not labels:
        raise EmorecError(f"{run} has no metrics.json to read its inferred labels from; the run did not finish")
    saved = _weights(run, cfg)
    where = resolve_device(device)
    env = Env(run, cfg.seed, where, use_bf16(cfg.trainer.precision, where))
    built = build(Spec.of(cfg), env, labels, _balance(cfg, labels, metrics, run), saved)
    return Trained(cfg, labels, built, env)


def _weights(run: Path, cfg: DictConfig) -> Path | None:
    """The run's saved adapter folder (or, for adapter=full, model folder); None when the run
    trained nothing (a zero-shot run predicts with the base as it is)."""
    if not cfg.adapter.train:
        return None
    folder = run / ("model" if cfg.adapter.peft is None else "adapter")
    if not folder.is_dir():
        overrides = run / ".hydra" / "overrides.yaml"
        given = OmegaConf.load(overrides) if overrides.is_file() else []
        keep = [o for o in given if not o.startswith(("resume=", "hydra.run.dir="))]
        command = " ".join(["python -m emorec", *keep, f"hydra.run.dir={run}", "resume=true"])
        raise EmorecError(f"{run} has no saved {folder.name}/: the run did not finish; finish it with: {command}")
    return folder


def _balance(cfg: DictConfig, labels: list[str], metrics: dict, run: Path) -> Balance:
    """The run's prediction-time logit adjustment (trainer.logit_adjust), from its train counts."""
    if not cfg.trainer.logit_adjust:
        return Balance()
    counts = metrics.get("data", {}).get("train_counts")
    if counts is None:
        raise EmorecError(f"{run} has no metrics.json with train_counts, which trainer.logit_adjust needs")
    targets = [i for i, label in enumerate(labels) for _ in range(counts.get(label, 0))]
    return Balance.of(targets, len(labels), 0.0, cfg.trainer.logit_adjust)
