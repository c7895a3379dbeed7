"""A user's own data: csv or jsonl files (dataset=csv, dataset=jsonl); Hugging Face datasets
(dataset=hf) come through emorec.data.hub to the same rules.

Each loader reads rows as (where, {column: value}) per source; one shared step (`table_splits`)
turns them into emorec.data.records.Splits with the same rules for every format: labels, dialogues and
their order, a split column, a dev split held out of train when there is none, multi-label rows.

csv and jsonl keep their own readers rather than `datasets`' builders: those give every bad
row's file and line, and keep values as written (pandas would turn "1" into 1 and "" into NaN).
"""

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path

from emorec.data.readers import (
    DELIMITERS,
    BadRows,
    LabelIndex,
    dialogue_examples,
    grouped,
    in_holdout,
    int_or_text,
    read_csv,
    read_text,
)
from emorec.data.records import SPLIT_NAMES, SPLITS, Row, Splits
from emorec.errors import EmorecError

MULTI_LABEL = "<several labels>"  # the label of a multi-label row under multi_label=drop

log = logging.getLogger(__name__)


def label_index(labels: list[str], found: set[str]) -> LabelIndex:
    """The labels' index into the data's values: their names; or, where the values are ids
    (integers, none of them a name), their positions in `labels`, as dataset=hf maps a
    ClassLabel. Said once in the log, and an id past the names is an error."""
    names = {x.strip().lower() for x in labels}
    if not found or any(v.lower() in names for v in found) or not all(v.isdigit() for v in found):
        return LabelIndex(labels)
    top = max(map(int, found))
    if top >= len(labels):
        raise EmorecError(
            f"the label column holds ids up to {top} but dataset.labels has {len(labels)} names; "
            "give one name per id, in id order"
        )
    log.info("the label column holds ids: %s", ", ".join(f"{i} = {name}" for i, name in enumerate(labels)))
    return LabelIndex(labels, [str(i) for i in range(len(labels))])


@dataclass(frozen=True)
class Columns:
    """Which column holds what (names, or positions in a csv file without a header)."""

    text: str = "text"
    label: str = "label"
    dialogue: str | None = None  # rows sharing it form a dialogue, for dataset.context_window
    speaker: str | None = None
    split: str | None = None  # train, dev/valid/validation or test, per row
    order: str | None = None  # order of rows within a dialogue (default: file order)

    @classmethod
    def of(cls, columns) -> "Columns":
        given = dict(columns or {})
        unknown = set(given) - {f.name for f in fields(cls)}
        if unknown:
            raise EmorecError(
                f"dataset.load.columns has unknown key(s) {', '.join(sorted(unknown))}; "
                "use text, label, dialogue, speaker, split, order"
            )
        return cls(**{k: None if v is None else str(v) for k, v in given.items()})

    def assigned(self) -> dict[str, str]:
        """{role: column} for the roles that have a column."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def named(self) -> list[str]:
        return list(self.assigned().values())


def _one_label(where: str, value, multi_label: str):
    """A row's label value, with a list of labels (a multi-label row) resolved by multi_label."""
    if not isinstance(value, list | tuple):
        return value if value is None or str(value).strip() else None  # an empty cell: no label
    if len(value) <= 1:
        return value[0] if value else None
    if multi_label == "first":
        return value[0]
    if multi_label == "drop":
        return MULTI_LABEL
    raise EmorecError(
        f"{where}: {len(value)} labels {list(value)}; emorec predicts one label per row: "
        "set dataset.multi_label=first (keep the first) or drop (leave such rows out)"
    )


def split_labels(rows: list[tuple[int, dict]], label: str, separator: str | None) -> list[tuple[int, dict]]:
    """csv rows whose label cell holds several labels joined by `separator`, as label lists."""
    if not separator:
        return rows
    separator = DELIMITERS.get(str(separator).lower(), str(separator))  # comma, semicolon, pipe, tab
    for _, r in rows:
        parts = [p.strip() for p in str(r[label] or "").split(separator) if p.strip()]
        r[label] = parts if len(parts) > 1 else (parts[0] if parts else r[label])
    return rows


def inferred_labels(found: set[str]) -> list[str]:
    """The label set from the train rows' values, sorted; a value that looks like several
    labels joined is taken as a class only with a warning."""
    labels = sorted(found)
    if joined := [v for v in labels if any(c in v for c in ",;|")]:
        log.warning(
            "label value(s) %s look like several labels joined: taken as classes of their own; "
            "set dataset.load.label_separator (e.g. ',') to read them as multi-label rows",
            ", ".join(repr(v) for v in joined[:3]),
        )
    if len(labels) < 2:
        raise EmorecError(f"inferred labels {labels} from train; a classification task needs at least two")
    return labels


def route(rows: dict, columns: Columns, multi_label: str, bad: BadRows) -> dict:
    """{split: [(where, row)]}: each row to the split its split column names, or its source's;
    a multi-label row's label resolved by multi_label."""
    routed = {s: [] for s in SPLITS}
    for source, items in rows.items():
        for where, r in items:
            split = source if columns.split is None else SPLIT_NAMES.get(str(r[columns.split] or "").strip().lower())
            if split is None:
                bad(where, f"split {r[columns.split]!r} is not train, dev or test")
                continue
            routed[split].append((where, {**r, columns.label: _one_label(where, r[columns.label], multi_label)}))
    return routed


def hold_out(routed: dict, split: str, key_of, fraction: float) -> None:
    """A fixed fraction of the train dialogues (or rows) moved to `split`, chosen by a hash of
    key_of(item): the same key always lands on the same side."""
    keys = [key_of(item) for item in routed["train"]]
    routed[split] = [item for item, k in zip(routed["train"], keys) if in_holdout(k, fraction)]
    routed["train"] = [item for item, k in zip(routed["train"], keys) if not in_holdout(k, fraction)]


def table_splits(
    rows: dict,
    labels: list[str] | None,
    columns: Columns,
    dev_fraction: float,
    multi_label: str,
    bad: BadRows,
    test_fraction: float | None = None,
) -> Splits:
    """Splits of rows read per source: {"train"|"dev"|"test"|any other name: [(where, row)]}.
    With columns.split, each row goes to the split its column names; otherwise to its source's.
    Without labels, the label set is the sorted set of train labels. Without a test split and
    with test_fraction, that fixed fraction of the train dialogues (or rows) is held out as test;
    then, without a dev split, dev_fraction of the rest."""
    if multi_label not in ("error", "first", "drop"):
        raise EmorecError(f"dataset.multi_label={multi_label!r}; use error, first or drop")
    routed = route(rows, columns, multi_label, bad)

    def dialogue_of(item):
        where, r = item
        # No dialogues: each row alone, keyed by its file (or dataset) name and line, not the
        # folder, so the holdouts below stay the same wherever the data is.
        return str(r[columns.dialogue]) if columns.dialogue else Path(where).name

    if not routed["test"] and test_fraction:
        # Salted: the same hash as dev's would hold out the same dialogues.
        hold_out(routed, "test", lambda item: f"test:{dialogue_of(item)}", test_fraction)
    if not routed["train"] or not routed["test"]:
        raise EmorecError(f"the data has no {'train' if not routed['train'] else 'test'} rows; give train and test")
    found = {str(r[columns.label]).strip() for _, r in routed["train"] if r[columns.label] is not None}
    found -= {"", MULTI_LABEL}
    if labels is None:
        labels = inferred_labels(found)
    index = label_index([str(x) for x in labels], found)

    if not routed["dev"]:
        hold_out(routed, "dev", dialogue_of, dev_fraction)
    leave_out = {MULTI_LABEL.lower(): "several labels (dataset.multi_label=drop)"}
    out = {}
    for split, items in routed.items():
        examples = []
        for dialogue, group in grouped(items, dialogue_of).items():
            if columns.order:
                group = sorted(group, key=lambda item: int_or_text(item[1][columns.order]))
            turns = [
                Row(w, Path(w).name, r[columns.speaker] if columns.speaker else None, r[columns.text], r[columns.label])
                for w, r in group
            ]
            examples += dialogue_examples(dialogue if columns.dialogue else None, turns, index, bad, leave_out)
        out[split] = examples
    if not out["test"]:
        raise EmorecError("the test split has no labelled rows (hidden test labels?); choose a labelled split as test")
    return bad.splits(labels, **out)


# --- csv and jsonl files ------------------------------------------------------------------------


def read_jsonl(path: Path, columns: Columns, bad: BadRows) -> list[tuple[int, dict]]:
    """Rows of a JSON-lines file with their line numbers; values as text (lists stay lists). A
    line that is not a JSON object (the last one, in a file cut short), or that lacks a field the
    columns name, is a bad row."""
    rows = []
    for n, line in enumerate(read_text(path, lines=True).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad(f"{path}:{n}", f"not valid JSON ({e.msg}; a file cut short?); one JSON object per line")
            continue
        if not isinstance(obj, dict):
            bad(f"{path}:{n}", "expected a JSON object per line")
            continue
        rows.append((n, {k: v if v is None or isinstance(v, list) else str(v) for k, v in obj.items()}))
    # A field no row has is a column option that names nothing; one some rows lack, bad rows.
    # A row without the label field has no label, as one whose label is null or empty.
    required = [c for c in columns.named() if c != columns.label]
    absent = [c for c in columns.named() if rows and not any(c in r for _, r in rows)]
    if absent:
        raise EmorecError(f"{path}: no row has field(s) {', '.join(absent)}; fix the data or dataset.load.columns")
    kept = []
    for n, r in rows:
        if missing := [c for c in required if c not in r]:
            bad(f"{path}:{n}", f"missing field(s) {', '.join(missing)}")
            continue
        kept.append((n, {columns.label: None, **r}))
    return kept


def load_table(
    format: str,
    data_files,
    labels: list[str] | None = None,
    columns=None,
    dev_fraction: float = 0.1,
    multi_label: str = "error",
    on_bad_row: str = "error",
    test_fraction: float | None = None,
    **csv_options,
) -> Splits:
    """A user's own data as csv or JSON lines (format csv or jsonl). data_files: one file with a
    split column (columns.split), or a mapping of split (train, dev, test) to a file.
    csv_options: `delimiter` (default: from the file name) and `header` (default true) of a csv
    file, and `label_separator`: a label cell holding several labels joined by it (`0,5`) is a
    multi-label row, which multi_label resolves."""
    if format not in ("csv", "jsonl"):
        raise EmorecError(f"dataset.load.format={format!r}; use csv or jsonl")
    separator = csv_options.pop("label_separator", None)
    if unknown := set(csv_options) - {"delimiter", "header"}:
        raise EmorecError(f"dataset.load has unknown key(s) {', '.join(sorted(unknown))}; check the spelling")
    if data_files is None:
        raise EmorecError(f"dataset={format} needs dataset.load.data_files: a file, or {{train: FILE, test: FILE}}")
    columns = Columns.of(columns)
    sources = dict(data_files) if not isinstance(data_files, str | Path) else {"file": data_files}
    if "file" in sources and columns.split is None:
        if not test_fraction:
            raise EmorecError(
                "one data file needs dataset.load.columns.split naming each row's split, or "
                "dataset.load.test_fraction=0.1 (and dev_fraction) to hold splits out of it"
            )
        sources = {"train": sources["file"]}
    unknown = set(sources) - {"file", *SPLITS}
    if unknown:
        raise EmorecError(f"dataset.load.data_files has split(s) {', '.join(sorted(unknown))}; use train, dev, test")
    rows, bad = {}, BadRows(f"{format} data", on_bad_row)
    for source, file in sources.items():
        file = Path(file).expanduser()
        if not file.is_file():
            raise EmorecError(f"dataset.load.data_files: {file} does not exist; fix the path")
        if format == "csv":
            read = split_labels(read_csv(file, columns.named(), bad=bad, **csv_options), columns.label, separator)
        else:
            read = read_jsonl(file, columns, bad)
        rows[source] = [(f"{file}:{line}", r) for line, r in read]
    return table_splits(rows, labels, columns, dev_fraction, multi_label, bad, test_fraction)
