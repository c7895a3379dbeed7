"""What every dataset loader shares: examples and splits, finding and downloading files,
reading them strictly, bad-row handling, and turning dialogues into examples with context.

The loaders themselves, one per dataset, are in emorec.datasets.
"""

import csv
import io
import json
import logging
import os
import random
import re
import shutil
import urllib.error
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from emorec.download import cache_dir, fetch, sha256_of
from emorec.errors import EmorecError

log = logging.getLogger(__name__)


Turn = tuple[str | None, str]  # (speaker or None, utterance)


@dataclass(frozen=True)
class Example:
    id: str
    text: str
    label: int
    speaker: str | None = None
    dialogue_id: str | None = None
    # Every earlier turn of the same dialogue, oldest first; dataset.context_window picks how
    # many of the most recent ones reach the prompt.
    context: tuple[Turn, ...] = ()


@dataclass
class Splits:
    """A loader's result: the label wording (index i = label i) and the three splits."""

    labels: list[str]
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    skipped: int = 0  # bad rows skipped under on_bad_row=skip
    left_out: dict[str, int] = field(default_factory=dict)  # utterances outside the task, by reason

    def __getitem__(self, split: str) -> list[Example]:
        return getattr(self, split)


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
    archive: str | None = None,
    source: str | None = None,
) -> Path:
    """The folder holding a dataset's files: data_dir, else $EMOREC_DATA_DIR/<name>, else the
    cache, filled when files are missing there from url (one file per name) or from archive (a
    zip, possibly of zips, holding the files), each checked against sha256."""
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise EmorecError(
                f"dataset.data_dir={folder} lacks {', '.join(missing)}; "
                f"point it at the folder that holds {', '.join(files)}"
            )
        return check_digests(folder, files, sha256)
    if os.environ.get("EMOREC_DATA_DIR"):
        folder = Path(os.environ["EMOREC_DATA_DIR"]).expanduser() / name
        if all((folder / f).is_file() for f in files):
            return check_digests(folder, files, sha256)
    folder = cache_dir() / "datasets" / name
    if all((folder / f).is_file() for f in files):
        return folder
    reason = source or "no download URL is configured"
    if url or archive:
        try:
            if archive:
                _fetch_archive(archive, folder, [f for f in files if not (folder / f).is_file()], sha256 or {})
            for f in files:
                if not (folder / f).is_file():
                    fetch(f"{url.rstrip('/')}/{f}", folder / f, (sha256 or {}).get(f))
            return folder
        except (urllib.error.URLError, OSError, EmorecError, zipfile.BadZipFile) as e:
            reason = f"download from {archive or url} failed: {e}"
    raise EmorecError(
        f"{name} data not found ({reason}); either set dataset.data_dir=/path/to/{name}, "
        f"or set EMOREC_DATA_DIR to a folder with a {name}/ subfolder holding {', '.join(files)}"
        + (", or allow the download" if url or archive else "")
    )


def check_digests(folder: Path, files: list[str], sha256: dict | None) -> Path:
    """Local copies of files with a known digest (the downloads'): a warning for each that
    differs, naming both digests. Not an error: a newer release or a fixed copy differs too."""
    for f in files:
        want = (sha256 or {}).get(f)
        if want and (got := sha256_of(folder / f)) != want:
            log.warning(
                "%s: sha256 %s, not the release's %s: another version, or a damaged or cut-short copy",
                folder / f,
                got,
                want,
            )
    return folder


def _fetch_archive(url: str, folder: Path, files: list[str], sha256: dict) -> None:
    """Download a zip and copy out the members whose paths end with the wanted file paths,
    looking inside nested zips too (DailyDialog ships a zip of per-split zips). Members are
    written to our own paths, never to the paths the archive names."""
    archive = fetch(url, folder / ("_" + url.rstrip("/").rsplit("/", 1)[-1]))
    try:
        found = _extract(zipfile.ZipFile(archive), folder, set(files))
    finally:
        archive.unlink(missing_ok=True)
    missing = sorted(set(files) - found)
    if missing:
        raise EmorecError(f"{url} holds no {', '.join(missing)}")
    for f in files:
        if f in sha256 and (got := sha256_of(folder / f)) != sha256[f]:
            (folder / f).unlink()
            raise EmorecError(f"checksum mismatch for {f} from {url}: expected sha256 {sha256[f]}, got {got}")


def _extract(zf: zipfile.ZipFile, folder: Path, wanted: set[str]) -> set[str]:
    found = set()
    for member in zf.namelist():
        target = next((f for f in wanted if member == f or member.endswith("/" + f)), None)
        if target is not None:
            (folder / target).parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(folder / target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            found.add(target)
        elif member.endswith(".zip"):
            with zf.open(member) as inner:
                found |= _extract(zipfile.ZipFile(io.BytesIO(inner.read())), folder, wanted - found)
    return found


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


def read_csv(
    path: Path, required: list[str], delimiter: str = ",", header: bool = True, bad=None
) -> list[tuple[int, dict]]:
    """Rows of a CSV file with their 1-based line numbers, keyed by the header's names (or, with
    header=False, by position: "0", "1", ...); checks that the required columns exist. A file
    cut short is an error: a quoted field never closed always (the rows cannot be told apart),
    a row with fewer or more fields than the header as a bad row (`bad`: emorec.data.BadRows;
    None raises)."""
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


@dataclass(frozen=True)
class Row:
    """One utterance as read from a file, before validation."""

    where: str  # file:line (or file: dialogue d, utterance u) for messages
    id: str
    speaker: str | None
    text: str | None
    label: object  # the raw label value; None for an utterance that is context only


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


def subsample(examples: list, n: int | None, seed: int) -> list:
    """A seeded random subset of n examples, in their original order (all when n is None)."""
    if n is None or n >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]
