"""Dataset loaders: each reads a dataset's original distribution files into splits of Examples.

A loader returns {"train": [...], "dev": [...], "test": [...]} with labels as indices into the
label list the dataset config gives (that list is also the label wording of the prompt).
"""

import csv
import io
import logging
import os
import random
import re
import urllib.error
from dataclasses import dataclass
from pathlib import Path

from emorec.download import cache_dir, fetch
from emorec.errors import EmorecError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    id: str
    text: str
    label: int
    speaker: str | None = None
    dialogue_id: str | None = None


# Typographic punctuation -> ASCII, so that the same sentence tokenises the same way whichever
# editor or release of a dataset it came through.
_ASCII = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": "-",
        "\u2014": "-",
        "\u2026": "...",
        "\u00a0": " ",
    }
)
_C1_CONTROLS = re.compile("[\x80-\x9f]")


def normalise_text(text: str) -> str:
    """Undo the encoding artifacts of dialogue corpora and fold punctuation to ASCII.

    Three kinds occur: UTF-8 read as cp1252 ("donâ€™t"), cp1252 bytes read as Latin-1 (a bare
    "\\x92" for an apostrophe, as in EmotionLines), and typographic quotes and dashes.
    """
    if "â€" in text or "Ã" in text:
        try:
            text = text.encode("cp1252").decode("utf-8")
        except UnicodeError:
            pass  # not mojibake after all; leave it
    text = _C1_CONTROLS.sub(lambda m: m.group().encode("latin-1").decode("cp1252", "ignore"), text)
    return " ".join(text.translate(_ASCII).split())


def locate(
    name: str,
    files: list[str],
    data_dir: str | None = None,
    url: str | None = None,
    sha256: dict | None = None,
) -> Path:
    """The folder holding a dataset's files: data_dir, else $EMOREC_DATA_DIR/<name>, else the
    cache, filled from url when files are missing there."""
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise EmorecError(
                f"dataset.load.data_dir={folder} lacks {', '.join(missing)}; "
                f"point it at the folder that holds {', '.join(files)}"
            )
        return folder
    if os.environ.get("EMOREC_DATA_DIR"):
        folder = Path(os.environ["EMOREC_DATA_DIR"]).expanduser() / name
        if all((folder / f).is_file() for f in files):
            return folder
    folder = cache_dir() / "datasets" / name
    reason = "no download URL is configured"
    if url:
        try:
            for f in files:
                if not (folder / f).is_file():
                    fetch(f"{url.rstrip('/')}/{f}", folder / f, (sha256 or {}).get(f))
            return folder
        except (urllib.error.URLError, OSError, EmorecError) as e:
            reason = f"download from {url} failed: {e}"
    raise EmorecError(
        f"{name} data not found ({reason}); either set dataset.load.data_dir=/path/to/{name}, "
        f"or set EMOREC_DATA_DIR to a folder with a {name}/ subfolder holding {', '.join(files)}, "
        f"or allow the download into {folder}"
    )


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise EmorecError(
            f"{path}: line {line} is not valid UTF-8 (byte {e.start}); re-save the file as UTF-8"
        ) from None


def read_csv(path: Path, required: list[str]) -> list[tuple[int, dict]]:
    """Rows of a CSV file with their 1-based line numbers; checks that columns exist."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise EmorecError(f"{path}: missing column(s) {', '.join(missing)}; found {reader.fieldnames}")
    return [(reader.line_num, row) for row in reader]


class BadRows:
    """Collects bad rows: raise on the first (on_bad_row=error) or count and skip (skip)."""

    def __init__(self, on_bad_row: str):
        if on_bad_row not in ("error", "skip"):
            raise EmorecError(f"dataset.load.on_bad_row={on_bad_row!r}; use error or skip")
        self.on_bad_row = on_bad_row
        self.skipped: list[str] = []

    def __call__(self, where: str, problem: str) -> None:
        if self.on_bad_row == "error":
            raise EmorecError(f"{where}: {problem}; fix the row or set dataset.load.on_bad_row=skip")
        self.skipped.append(f"{where}: {problem}")


MELD_FILES = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}


def load_meld(
    labels: list[str],
    data_dir: str | None = None,
    url: str | None = None,
    sha256: dict | None = None,
    column: str = "Emotion",
    on_bad_row: str = "error",
) -> dict[str, list[Example]]:
    """MELD's {train,dev,test}_sent_emo.csv, one example per utterance. `column` picks the
    task: Emotion (7 classes) or Sentiment (3)."""
    folder = locate("meld", list(MELD_FILES.values()), data_dir, url, sha256)
    index = {name.lower(): i for i, name in enumerate(labels)}
    bad = BadRows(on_bad_row)
    splits = {}
    for split, filename in MELD_FILES.items():
        path = folder / filename
        examples = []
        for line, row in read_csv(path, ["Utterance", "Speaker", column, "Dialogue_ID", "Utterance_ID"]):
            text = normalise_text(row["Utterance"] or "")
            label = (row[column] or "").strip().lower()
            if not text:
                bad(f"{path}:{line}", "empty utterance")
            elif label not in index:
                bad(f"{path}:{line}", f"label {label!r} is not one of {labels}")
            else:
                examples.append(
                    Example(
                        id=f"dia{row['Dialogue_ID']}_utt{row['Utterance_ID']}",
                        text=text,
                        label=index[label],
                        speaker=row["Speaker"],
                        dialogue_id=row["Dialogue_ID"],
                    )
                )
        splits[split] = examples
    if bad.skipped:
        log.warning("meld: skipped %d bad row(s); first: %s", len(bad.skipped), bad.skipped[0])
    return splits


def subsample(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """A seeded random subset of n examples, in their original order (all when n is None)."""
    if n is None or n >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]
