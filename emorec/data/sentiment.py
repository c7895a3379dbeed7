"""Sentiment datasets: the Stanford Sentiment Treebank (SST-2, SST-5) and the text of the
multimodal sentiment corpora in the MMSA layout (CMU-MOSI, CH-SIMS), whose real-valued scores
become classes (`Polarity`). Each loader takes the same arguments as those in corpora.py."""

from dataclasses import dataclass
from pathlib import Path

from emorec.data.files import locate
from emorec.data.readers import BadRows, LabelIndex, dialogue_examples, grouped, int_or_text, read_csv, read_text
from emorec.data.records import SPLIT_NAMES, SPLITS, Row, Splits
from emorec.errors import EmorecError

# --- Stanford Sentiment Treebank ---------------------------------------------------------------


def load_sst(
    labels: list[str],
    granularity: str,
    data_dir: str | None = None,
    url: str | None = None,
    sha256: dict | None = None,
    verify: str = "warn",
    raw_labels: list | None = None,
    on_bad_row: str = "error",
) -> Splits:
    """SST sentences, stsa.{fine,binary}.{train,dev,test}: one `LABEL sentence` per line, the
    label an integer (fine: 0 very negative .. 4 very positive; binary: 0 negative, 1 positive)."""
    if granularity not in ("fine", "binary"):
        raise EmorecError(f"dataset.load.granularity={granularity!r}; use fine (SST-5) or binary (SST-2)")
    files = {s: f"stsa.{granularity}.{s}" for s in SPLITS}
    folder = locate("sst", list(files.values()), data_dir, url, sha256, verify=verify)
    index = LabelIndex(labels, raw_labels if raw_labels is not None else list(range(len(labels))))
    bad = BadRows(f"sst-{granularity}", on_bad_row)
    out = {}
    for split, filename in files.items():
        path = folder / filename
        rows = []
        for line, text in enumerate(read_text(path, lines=True).splitlines(), 1):
            if not text.strip():
                continue  # a trailing blank line is not a row
            raw, _, sentence = text.partition(" ")
            rows.append(Row(f"{path}:{line}", f"{split}{line}", None, sentence, raw))
        out[split] = dialogue_examples(None, rows, index, bad)
    return bad.splits(labels, **out)


# --- Multimodal sentiment transcripts in the MMSA layout: CMU-MOSI, CH-SIMS ----------------------


@dataclass(frozen=True)
class Polarity:
    """How a real-valued sentiment score becomes a class word.

    3 classes: |score| <= neutral_band is neutral, else the sign. 2 classes: the sign, with a
    score of exactly 0 counted as `zero` (positive or negative), or left out (`drop`).
    """

    classes: int
    zero: str
    neutral_band: float = 0.0

    def __post_init__(self):
        if self.classes not in (2, 3) or self.zero not in ("positive", "negative", "drop"):
            raise EmorecError(
                f"dataset.load.classes={self.classes}, zero={self.zero!r}; "
                "use classes 2 or 3 and zero positive, negative or drop"
            )

    def __call__(self, score: float) -> str | None:
        if self.classes == 3:
            return "neutral" if abs(score) <= self.neutral_band else ("positive" if score > 0 else "negative")
        if score == 0:
            return None if self.zero == "drop" else self.zero
        return "positive" if score > 0 else "negative"


def _load_scored_csv(
    path: Path, columns: dict, video_clip, polarity: Polarity, labels, raw_labels, bad: BadRows
) -> Splits:
    """The MMSA label.csv layout both MOSI and CH-SIMS use: one row per clip with its text, a
    real-valued score and its split in `mode`. A dialogue is a video, its clips in order.
    `video_clip(row)`: the clip's video and its place in it."""
    index = LabelIndex(labels, raw_labels)
    by_split = {s: [] for s in SPLITS}
    for line, r in read_csv(path, list(columns.values()), bad=bad):
        where = f"{path}:{line}"
        split = SPLIT_NAMES.get((r[columns["mode"]] or "").strip().lower())
        try:
            score = float(r[columns["score"]])
        except (TypeError, ValueError):
            bad(where, f"score {r[columns['score']]!r} is not a number")
            continue
        if split is None:
            bad(where, f"mode {r[columns['mode']]!r} is not train, valid/dev or test")
            continue
        video, clip = video_clip(r)
        label = polarity(score)
        if label is None:
            bad.left_out["score exactly 0 (zero=drop)"] += 1
            continue
        by_split[split].append((video, clip, Row(where, f"{video}_{clip}", None, r[columns["text"]], label)))
    out = {}
    for split, items in by_split.items():
        videos = grouped(items, lambda item: item[0])
        out[split] = [
            ex
            for video, clips in videos.items()
            for ex in dialogue_examples(
                video, [row for _, _, row in sorted(clips, key=lambda c: int_or_text(c[1]))], index, bad
            )
        ]
    return bad.splits(labels, **out)


def load_mosi(
    labels: list[str],
    classes: int,
    zero: str = "positive",
    neutral_band: float = 0.0,
    raw_labels: list | None = None,
    on_bad_row: str = "error",
    **where,
) -> Splits:
    """CMU-MOSI transcripts, label.csv (`id,text,label,mode`, label in [-3, 3]); the id is
    `<video>_<clip>`. See conf/dataset/mosi2.yaml and mosi3.yaml for the class thresholds.
    where: data_dir, url, sha256 and verify, as emorec.data.files.locate takes them."""

    def video_clip(r):
        video, _, clip = r["id"].rpartition("_")
        return video or r["id"], clip

    rule = Polarity(classes, zero, neutral_band)  # a wrong setting is told before any download
    path = locate("mosi", ["label.csv"], **where) / "label.csv"
    columns = {"text": "text", "score": "label", "mode": "mode", "id": "id"}
    return _load_scored_csv(path, columns, video_clip, rule, labels, raw_labels, BadRows("mosi", on_bad_row))


def load_chsims(
    labels: list[str],
    classes: int = 2,
    score_column: str = "label",
    zero: str = "negative",
    neutral_band: float = 0.0,
    raw_labels: list | None = None,
    data_dir: str | None = None,
    on_bad_row: str = "error",
) -> Splits:
    """CH-SIMS, official label.csv (`video_id,clip_id,text,label,label_T,label_A,label_V,
    annotation,mode`, scores in [-1, 1]). score_column picks the multimodal `label` (default)
    or the text-only `label_T`. No public download: the owners hand it out (see the error)."""
    rule = Polarity(classes, zero, neutral_band)
    source = "CH-SIMS is shared by its authors via github.com/thuiar/MMSA, not by a public URL"
    path = locate("chsims", ["label.csv"], data_dir, source=source) / "label.csv"
    columns = {"text": "text", "score": score_column, "mode": "mode", "video_id": "video_id", "clip_id": "clip_id"}
    return _load_scored_csv(
        path, columns, lambda r: (r["video_id"], r["clip_id"]), rule, labels, raw_labels, BadRows("chsims", on_bad_row)
    )
