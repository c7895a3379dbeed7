"""A finished run applied to new text: `emorec predict RUN_DIR` and `emorec.load(run_dir)`.

Everything comes from the run's own directory: its config.yaml (model, head, prompt, scoring,
speed components), its saved adapter (or whole model) and its labels. The model is built by
the same code the run used (emorec.run.build_model, emorec.fast.dispatch) and predicts through
the same path as the run's evaluation (emorec.predict), so the same texts get the same labels
and probabilities.
"""

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from emorec.data import Example, normalise_text
from emorec.errors import EmorecError
from emorec.fast import Engine, Fast, dispatch
from emorec.predict import predict
from emorec.prompt import Context, encode_prompts
from emorec.run import Env, build_model, build_task, resolve_device, use_bf16
from emorec.settings import ADDED_SINCE, is_encoder
from emorec.tasks import Balance

Turn = str | tuple[str | None, str]  # an earlier utterance, or (speaker, utterance)


@dataclass
class Trained:
    """A run's trained model, ready to label text as the run's evaluation did."""

    config: DictConfig
    labels: list[str]
    model: object
    tokenizer: object
    task: object
    engine: Engine
    env: Env

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
        prompt, trainer = self.config.prompt, self.config.trainer
        ids = encode_prompts(
            self.tokenizer,
            examples,
            prompt.template,
            prompt.system,
            self.labels,
            trainer.max_length,
            self.config.dataset.context_window,
            Context(prompt.context, prompt.context_layout, prompt.context_after),
            prompt.cue,
        )
        batch_size = batch_size or trainer.eval_batch_size
        result = predict(
            self.model, self.task, ids, self.engine, batch_size=batch_size, autocast=self.env.bf16, desc="predict"
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
    cfg = OmegaConf.load(run / "config.yaml")
    for key, value in ADDED_SINCE.items():  # a run from before a setting existed ran as its old value
        if OmegaConf.select(cfg, key, default=KeyError) is KeyError:
            OmegaConf.update(cfg, key, value, force_add=True)
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
    env = Env(run, cfg.seed, where, use_bf16(cfg.trainer.precision, where), None, None, time.perf_counter())
    fast = Fast(**cfg.fast)
    model, tokenizer, _ = build_model(cfg.model, cfg.adapter, cfg.head, cfg.prompt, fast, env, labels, saved)
    engine = dispatch(model, fast, env.device, cfg.trainer.max_pass_tokens)
    kind = "encoder" if is_encoder(cfg.model) else cfg.head.name
    task = build_task(tokenizer, cfg.prompt, cfg.trainer, labels, engine, kind, _balance(cfg, labels, metrics, run))
    return Trained(cfg, labels, model, tokenizer, task, engine, env)


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


# --- emorec predict -----------------------------------------------------------------------------


def read_inputs(args) -> tuple[list[str], list[list[Turn]] | None, list[str | None] | None]:
    """(texts, contexts, speakers) from --text, --input or stdin. Rows sharing a dialogue
    (--dialogue-column) are in order: each has the earlier ones as its context."""
    if args.text:
        rows = [{"text": t} for t in args.text]
    elif args.input and args.input != "-":
        rows = _read_file(Path(args.input), args)
    elif args.input == "-" or not sys.stdin.isatty():
        rows = [{"text": line} for line in sys.stdin.read().splitlines() if line.strip()]
    else:
        rows = []
    if not rows:
        raise EmorecError("no texts to label; give --text TEXT, --input FILE (csv, jsonl or txt) or lines on stdin")
    if not args.dialogue_column:
        return [r["text"] for r in rows], None, [r.get("speaker") for r in rows] if args.speaker_column else None
    seen: dict = {}
    contexts = []
    for r in rows:
        turns = seen.setdefault(r["dialogue"], [])
        contexts.append(list(turns))
        turns.append((r.get("speaker"), r["text"]))
    return [r["text"] for r in rows], contexts, [r.get("speaker") for r in rows]


def _read_file(path: Path, args) -> list[dict]:
    if not path.is_file():
        raise EmorecError(f"--input {path} does not exist; fix the path")
    columns = {"text": args.column, "dialogue": args.dialogue_column, "speaker": args.speaker_column}
    columns = {k: c for k, c in columns.items() if c}
    if path.suffix == ".txt":
        if set(columns) != {"text"}:
            raise EmorecError("a .txt input has one text per line and no columns; use a csv or jsonl file")
        return [{"text": line} for line in path.read_text().splitlines() if line.strip()]
    if path.suffix in (".csv", ".tsv"):
        with open(path, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            found = reader.fieldnames or []
            rows = list(reader)
    elif path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        found = list(rows[0]) if rows else []
    else:
        raise EmorecError(f"--input {path}: use a .csv, .tsv, .jsonl or .txt file")
    missing = [c for c in columns.values() if c not in found]
    if missing:
        raise EmorecError(
            f"{path} has no column {missing[0]!r} (it has {', '.join(map(str, found))}); choose one with --column"
            + (" (or --dialogue-column/--speaker-column)" if missing[0] != args.column else "")
        )
    return [{k: r.get(c) for k, c in columns.items()} for r in rows]


def write_outputs(rows: list[dict], labels: list[str], output: str | None, format: str | None) -> None:
    """csv (text, label, prob_<label>... or generated) or jsonl (probs as an object)."""
    format = format or ("jsonl" if output and output.endswith(".jsonl") else "csv")
    f = open(output, "w", newline="") if output else sys.stdout
    try:
        if format == "jsonl":
            for r in rows:
                f.write(json.dumps(r) + "\n")
            return
        generated = "generated" in rows[0]
        writer = csv.writer(f)
        writer.writerow(["text", "label", *(["generated"] if generated else [f"prob_{lab}" for lab in labels])])
        for r in rows:
            tail = [r["generated"]] if generated else [round(r["probs"][lab], 6) for lab in labels]
            writer.writerow([r["text"], r["label"], *tail])
    finally:
        if output:
            f.close()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="emorec predict",
        description="Label texts with a finished run's model, exactly as the run's evaluation labelled its test set.",
    )
    parser.add_argument("run_dir", help="the run's directory (its hydra.run.dir)")
    parser.add_argument(
        "overrides", nargs="*", help="key=value changes to the run's config, e.g. model.name_or_path=PATH"
    )
    parser.add_argument("--text", action="append", default=[], help="a text to label (repeatable)")
    parser.add_argument("--input", help="a .csv, .tsv, .jsonl or .txt file (one text per line); - for stdin")
    parser.add_argument("--column", default="text", help="the input's text column (default: text)")
    parser.add_argument("--dialogue-column", help="rows sharing it form a dialogue: earlier rows are context")
    parser.add_argument("--speaker-column", help="each row's speaker, for prompts with dialogue context")
    parser.add_argument("--output", help="a .csv or .jsonl file (default: csv on stdout)")
    parser.add_argument("--format", choices=["csv", "jsonl"], help="the output format (default: from --output)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: a GPU if there is one)")
    parser.add_argument("--batch-size", type=int, help="examples per batch (default: the run's eval_batch_size)")
    args = parser.parse_args(argv)
    try:
        texts, context, speakers = read_inputs(args)
        start = time.perf_counter()
        trained = load(args.run_dir, args.device, args.overrides)
        loaded = time.perf_counter()
        rows = trained.predict(texts, context, speakers, args.batch_size)
        seconds = time.perf_counter() - loaded
        write_outputs(rows, trained.labels, args.output, args.format)
    except EmorecError as e:
        raise SystemExit(f"emorec predict: error: {e}") from None
    print(
        f"emorec predict: labelled {len(rows)} texts in {seconds:.1f} s ({len(rows) / seconds:.1f} texts/s; "
        f"model loaded in {loaded - start:.1f} s)",
        file=sys.stderr,
    )
