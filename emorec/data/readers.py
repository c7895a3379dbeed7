"""Reading a dataset's files strictly (UTF-8, csv, json: every problem names its file and
line), handling bad rows, and turning a dialogue's rows into examples with their context."""

import csv
import io
import json
import logging
import zlib
from collections import Counter
from pathlib import Path

from emorec.data.records import Example, Row, Splits, normalise_text
from emorec.errors import EmorecError

log = logging.getLogger(__name__)


def read_text(path: Path, lines: bool = False) -> str:
    """A UTF-8 file's text. lines=True: a line-oriented file (csv, jsonl, txt), which warns when
    its last line has no newline: the release files all end with one, and a copy or download
    that stopped early does not."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise EmorecError(
            f"{path}: line {line} is not valid UTF-8 (byte {e.start}); re-save the file as UTF-8"
        ) from None
    if lines and text and not text.endswith(("\n", "\r")):
        log.warning("%s does not end with a newline: its last line may be cut short (an interrupted copy?)", path)
    return text


# Spellings of a delimiter that a shell or a YAML file passes on as they are: `"\t"` typed in
# bash reaches the program as a backslash and a t.
DELIMITERS = {"\\t": "\t", "tab": "\t", "tsv": "\t", "comma": ",", "csv": ",", "semicolon": ";", "pipe": "|"}


def delimiter_of(value, path: Path) -> str:
    """The one-character delimiter of a csv file: `value` as given (a character, or \\t, tab,
    tsv, comma, semicolon, pipe), or, None, inferred from the file's name (.tsv: tab, else ,)."""
    if value is None:
        return "\t" if path.suffix.lower() == ".tsv" else ","
    value = str(value)
    if len(value) == 1:
        return value
    if value.lower() in DELIMITERS:
        return DELIMITERS[value.lower()]
    raise EmorecError(
        f"dataset.load.delimiter={value!r} is not one character; use tab (or \\t), ',', ';' or '|', "
        "or leave it unset to infer it from the file name (.tsv: tab)"
    )


def read_csv(
    path: Path, required: list[str], delimiter: str | None = None, header: bool = True, bad=None
) -> list[tuple[int, dict]]:
    """Rows of a CSV file with their 1-based line numbers, keyed by the header's names (or, with
    header=False, by position: "0", "1", ...); checks that the required columns exist. A file
    cut short is an error: a quoted field never closed always (the rows cannot be told apart),
    a row with fewer or more fields than the header as a bad row (`bad`: emorec.data.BadRows;
    None raises). `delimiter`: see delimiter_of."""
    delimiter = delimiter_of(delimiter, path)
    reader = csv.reader(io.StringIO(read_text(path, lines=True), newline=""), delimiter=delimiter, strict=True)
    rows, line, names = [], 1, None
    try:
        if header:
            names = next(reader, [])
            _check_columns(path, names, required, header, delimiter)
        line = reader.line_num + 1
        for values in reader:
            first, line = line, reader.line_num + 1  # a quoted field may span lines
            if not values:
                continue
            names = names or [str(i) for i in range(len(values))]  # no header: the first row's width
            if len(values) != len(names):
                problem = f"{len(values)} fields where the {'header has' if header else 'first row has'} {len(names)}"
                (bad or _raise)(f"{path}:{first}", f"{problem} (a file cut short, or a broken row)")
                continue
            rows.append((first, dict(zip(names, values))))
    except csv.Error as e:
        raise EmorecError(
            f"{path}:{line}: {e} (a quoted field that never closes: the file is cut short or a quote is "
            "missing); re-copy or re-download the file"
        ) from None
    if not header:
        _check_columns(path, names or [], required, header, delimiter)
    return rows


def _check_columns(path: Path, found: list[str], required: list[str], header: bool, delimiter: str) -> None:
    missing = [c for c in required if c not in found]
    if missing:
        shown = f"found {found}" if header else f"rows have {len(found)} columns (0 to {len(found) - 1})"
        hint = " (a tab- or ;-separated file? set dataset.load.delimiter)" if header and delimiter == "," else ""
        raise EmorecError(
            f"{path}: missing column(s) {', '.join(missing)}; {shown}{hint}; "
            "fix the header or the dataset.load column options"
        )


def _raise(where: str, problem: str):
    raise EmorecError(f"{where}: {problem}; fix the file")


def read_json(path: Path):
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        cut = " (it ends mid-way: cut short?)" if not text[e.pos :].strip() else ""
        raise EmorecError(
            f"{path}: line {e.lineno} is not valid JSON ({e.msg}){cut}; fix or re-download the file"
        ) from None


class BadRows:
    """Bad rows raise on the first (on_bad_row=error) or are counted and skipped (skip).
    Utterances that the task leaves out by definition are counted separately (left_out)."""

    def __init__(self, name: str, on_bad_row: str):
        if on_bad_row not in ("error", "skip"):
            raise EmorecError(f"dataset.on_bad_row={on_bad_row!r}; use error or skip")
        self.name, self.on_bad_row = name, on_bad_row
        self.skipped: list[str] = []
        self.left_out: Counter = Counter()

    def __call__(self, where: str, problem: str) -> None:
        if self.on_bad_row == "error":
            raise EmorecError(f"{where}: {problem}; fix the row or set dataset.on_bad_row=skip")
        self.skipped.append(f"{where}: {problem}")

    def splits(self, labels: list[str], train, dev, test) -> Splits:
        """The loader's result, after logging what was skipped and left out: nothing goes silently."""
        if self.skipped:
            log.warning("%s: skipped %d bad row(s); first: %s", self.name, len(self.skipped), self.skipped[0])
        for reason, n in self.left_out.items():
            log.info("%s: left out %d utterance(s): %s", self.name, n, reason)
        return Splits(list(labels), train, dev, test, len(self.skipped), dict(self.left_out))


class LabelIndex:
    """Raw label values as the files write them -> index into the prompt's label list.
    raw_labels[i] is the file's value for labels[i] (default: the label itself); matching
    ignores case and surrounding space."""

    def __init__(self, labels: list[str], raw_labels: list | None = None):
        raw = [str(r) for r in (raw_labels if raw_labels is not None else labels)]
        if len(raw) != len(labels):
            raise EmorecError(
                f"dataset.load.raw_labels has {len(raw)} values for {len(labels)} labels; give one per label"
            )
        self.raw = raw
        self.index = {r.strip().lower(): i for i, r in enumerate(raw)}

    def get(self, value) -> int | None:
        return self.index.get(str(value).strip().lower())


def dialogue_examples(
    dialogue_id: str | None,
    rows: list[Row],
    index: LabelIndex,
    bad: BadRows,
    leave_out: dict | None = None,
) -> list[Example]:
    """Examples of one dialogue's utterances (in order), each carrying the turns before it.

    leave_out maps raw labels outside the task to the reason (EmotionLines' "non-neutral"):
    those utterances stay in the context of later ones but are not examples. A row with an
    empty utterance or a label outside the label set is a bad row.
    """
    leave_out = leave_out or {}
    examples, context = [], []
    for row in rows:
        text = normalise_text(row.text or "")
        if not text:
            bad(row.where, "empty utterance")
            continue
        raw = "" if row.label is None else str(row.label).strip()
        if row.label is None or raw.lower() in leave_out:
            bad.left_out[leave_out.get(raw.lower(), "no label (context only)")] += 1
        elif (label := index.get(raw)) is None:
            bad(row.where, f"label {raw!r} is not one of {index.raw}")
        else:
            examples.append(Example(row.id, text, label, row.speaker, dialogue_id, tuple(context)))
        if dialogue_id is not None:  # without a dialogue, rows are unrelated sentences
            context.append((row.speaker, text))
    return examples


def int_or_text(value) -> tuple:
    """Sort key for ids that are usually integers ("10" after "9")."""
    return (0, int(value), "") if str(value).strip().isdigit() else (1, 0, str(value))


def grouped(rows: list, key) -> dict:
    """Rows grouped by key(row), groups in order of first appearance, rows in file order."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def in_holdout(key: str, fraction: float) -> bool:
    """A stable pseudo-random choice of a fraction of keys (dialogues) for a held-out split:
    the same key always lands on the same side, whatever else is in the file."""
    return zlib.crc32(key.encode()) % 10_000 < fraction * 10_000
