"""`emorec predict RUN_DIR`: label texts from the command line, a file or stdin with a finished
run's model (emorec.inference.load), as csv or jsonl."""

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

from emorec.errors import EmorecError
from emorec.inference import Turn, load


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
    with open(path, newline="") as f:  # read once; newline="": the csv reader's line endings
        text = f.read()
    if not text.strip():
        raise EmorecError(f"--input {path} is empty; give it texts (one per line in a .txt, rows in a csv or jsonl)")
    columns = {"text": args.column, "dialogue": args.dialogue_column, "speaker": args.speaker_column}
    columns = {k: c for k, c in columns.items() if c}
    if path.suffix == ".txt":
        if set(columns) != {"text"}:
            raise EmorecError("a .txt input has one text per line and no columns; use a csv or jsonl file")
        return [{"text": line} for line in text.splitlines() if line.strip()]
    if path.suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix == ".tsv" else ",")
        found = reader.fieldnames or []
        rows = list(reader)
    elif path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        found = list(rows[0]) if rows else []
    else:
        raise EmorecError(f"--input {path}: use a .csv, .tsv, .jsonl or .txt file")
    if not rows:
        raise EmorecError(f"--input {path} has a header ({', '.join(map(str, found))}) but no rows; add rows to label")
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
