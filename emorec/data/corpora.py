"""One loader per emotion corpus, each reading the dataset's own distribution format (the
sentiment datasets: emorec.data.sentiment).

Every loader takes the prompt's label wording (`labels`), where to find the files (`data_dir`,
else $EMOREC_DATA_DIR/<name>, else a download where an official URL exists) and `on_bad_row`,
and returns emorec.data.records.Splits: train, dev and test Examples whose label is an index
into `labels`, each carrying the earlier turns of its dialogue as context.
"""

import re
from pathlib import Path

from emorec.data.files import locate
from emorec.data.readers import (
    BadRows,
    LabelIndex,
    dialogue_examples,
    grouped,
    in_holdout,
    int_or_text,
    read_csv,
    read_json,
    read_text,
)
from emorec.data.records import SPLITS, Row, Splits
from emorec.errors import EmorecError

# --- Friends TV dialogues (MELD, EmoryNLP, EmotionLines) and Mastodon threads -------------------


def _csv_examples(path: Path, columns: list[str], dialogue_of, row_of, index: LabelIndex, bad: BadRows) -> list:
    """Examples of a CSV file with an utterance per row (MELD, EmoryNLP): rows grouped into
    dialogues by dialogue_of(row) and ordered by Utterance_ID; row_of(where, dialogue, row)
    makes each a Row."""
    examples = []
    for dialogue, items in grouped(read_csv(path, columns, bad=bad), lambda item: dialogue_of(item[1])).items():
        items = sorted(items, key=lambda item: int_or_text(item[1]["Utterance_ID"]))
        rows = [row_of(f"{path}:{line}", dialogue, r) for line, r in items]
        examples += dialogue_examples(dialogue, rows, index, bad)
    return examples


MELD_FILES = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}


def load_meld(
    labels: list[str],
    data_dir: str | None = None,
    url: str | None = None,
    sha256: dict | None = None,
    verify: str = "warn",
    column: str = "Emotion",
    raw_labels: list | None = None,
    on_bad_row: str = "error",
) -> Splits:
    """MELD's {train,dev,test}_sent_emo.csv, one example per utterance. `column` picks the
    task: Emotion (7 classes) or Sentiment (3)."""
    folder = locate("meld", list(MELD_FILES.values()), data_dir, url, sha256, verify=verify)
    index, bad = LabelIndex(labels, raw_labels), BadRows("meld", on_bad_row)
    columns = ["Utterance", "Speaker", column, "Dialogue_ID", "Utterance_ID"]

    def row_of(where, dia, r):
        return Row(where, f"dia{dia}_utt{r['Utterance_ID']}", r["Speaker"], r["Utterance"], r[column])

    out = {
        split: _csv_examples(folder / name, columns, lambda r: r["Dialogue_ID"], row_of, index, bad)
        for split, name in MELD_FILES.items()
    }
    return bad.splits(labels, **out)


EMORYNLP_FILES = {s: f"emorynlp_{s}_final.csv" for s in SPLITS}


def _speakers(value: str) -> str | None:
    """EmoryNLP writes speakers as a Python list literal, "['Rachel Green']"; read it as text."""
    names = [a or b for a, b in re.findall(r"'([^']*)'|\"([^\"]*)\"", value or "")]
    return " and ".join(names) or (value or "").strip() or None


def load_emorynlp(
    labels: list[str],
    data_dir: str | None = None,
    url: str | None = None,
    sha256: dict | None = None,
    verify: str = "warn",
    raw_labels: list | None = None,
    on_bad_row: str = "error",
) -> Splits:
    """EmoryNLP's emorynlp_{train,dev,test}_final.csv; a dialogue is a scene of an episode."""
    folder = locate("emorynlp", list(EMORYNLP_FILES.values()), data_dir, url, sha256, verify=verify)
    index, bad = LabelIndex(labels, raw_labels), BadRows("emorynlp", on_bad_row)
    columns = ["Utterance", "Speaker", "Emotion", "Scene_ID", "Utterance_ID", "Season", "Episode"]

    def scene_of(r):
        return f"s{r['Season']}_e{r['Episode']}_c{r['Scene_ID']}"

    def row_of(where, scene, r):
        return Row(where, f"{scene}_u{r['Utterance_ID']}", _speakers(r["Speaker"]), r["Utterance"], r["Emotion"])

    out = {
        split: _csv_examples(folder / name, columns, scene_of, row_of, index, bad)
        for split, name in EMORYNLP_FILES.items()
    }
    return bad.splits(labels, **out)


def _json_examples(
    path: Path,
    split: str,
    text: str,
    label: str,
    speaker: str | None,
    index: LabelIndex,
    bad: BadRows,
    leave_out: dict | None = None,
) -> list:
    """Examples of a JSON list of dialogues, each a list of utterance objects (EmotionLines,
    Mastodon) with the given text, label and speaker fields; an object lacking one is a bad row."""
    data = read_json(path)
    if not isinstance(data, list) or not all(isinstance(d, list) for d in data):
        raise EmorecError(f"{path}: expected a JSON list of dialogues, each a list of utterances")
    fields = [f for f in (speaker, text, label) if f]
    examples = []
    for d, dialogue in enumerate(data):
        rows = []
        for u, obj in enumerate(dialogue):
            where = f"{path}: dialogue {d} utterance {u}"
            missing = [f for f in fields if not isinstance(obj, dict) or f not in obj]
            if missing:
                bad(where, f"missing field(s) {', '.join(missing)}")
                continue
            rows.append(Row(where, f"{split}{d}_u{u}", obj[speaker] if speaker else None, obj[text], obj[label]))
        examples += dialogue_examples(f"{split}{d}", rows, index, bad, leave_out)
    return examples


FRIENDS_FILES = {s: f"friends_{s}.json" for s in SPLITS}


def load_friends(
    labels: list[str],
    data_dir: str | None = None,
    url: str | None = None,
    sha256: dict | None = None,
    verify: str = "warn",
    raw_labels: list | None = None,
    leave_out: dict | None = None,
    on_bad_row: str = "error",
) -> Splits:
    """EmotionLines Friends: friends_{train,dev,test}.json. Utterances whose gold label is in
    leave_out (by default `non-neutral`: annotators had no majority) are not examples of the
    7-class task, as in the literature, but stay in the context of later utterances."""
    folder = locate("friends", list(FRIENDS_FILES.values()), data_dir, url, sha256, verify=verify)
    index, bad = LabelIndex(labels, raw_labels), BadRows("friends", on_bad_row)
    leave_out = {k.lower(): v for k, v in (leave_out or {}).items()}
    out = {
        split: _json_examples(folder / name, split, "utterance", "emotion", "speaker", index, bad, leave_out)
        for split, name in FRIENDS_FILES.items()
    }
    return bad.splits(labels, **out)


MASTODON_FILES = {s: f"{s}.json" for s in SPLITS}


def load_mastodon(
    labels: list[str],
    raw_labels: list,
    data_dir: str | None = None,
    url: str | None = None,
    sha256: dict | None = None,
    verify: str = "warn",
    on_bad_row: str = "error",
) -> Splits:
    """Mastodon dialogue sentiment, {train,dev,test}.json: dialogues of {utterance, sentiment,
    act}; sentiment is + - or * (raw_labels maps them to the label words). No speakers."""
    folder = locate("mastodon", list(MASTODON_FILES.values()), data_dir, url, sha256, verify=verify)
    index, bad = LabelIndex(labels, raw_labels), BadRows("mastodon", on_bad_row)
    out = {
        split: _json_examples(folder / name, split, "utterance", "sentiment", None, index, bad)
        for split, name in MASTODON_FILES.items()
    }
    return bad.splits(labels, **out)


# --- EmoContext (SemEval-2019 Task 3) -------------------------------------------------------------

EMOCONTEXT_FILES = {"train": "train.txt", "dev": "dev.txt", "test": "test.txt"}


def load_emocontext(
    labels: list[str],
    raw_labels: list | None = None,
    data_dir: str | None = None,
    on_bad_row: str = "error",
) -> Splits:
    """EmoContext's {train,dev,test}.txt: a header `id turn1 turn2 turn3 label`, then one
    three-turn conversation a line, tab-separated (quotes are text: the turns are written
    unquoted). The third turn is the example, its label happy, sad, angry or others; the first
    two, a user's and the agent's, are its context."""
    source = "EmoContext is shared by the task's organisers (SemEval-2019 Task 3), not by a public URL"
    folder = locate("emocontext", list(EMOCONTEXT_FILES.values()), data_dir, source=source)
    index, bad = LabelIndex(labels, raw_labels), BadRows("emocontext", on_bad_row)
    out = {}
    for split, name in EMOCONTEXT_FILES.items():
        path, examples = folder / name, []
        header, *lines = read_text(path, lines=True).splitlines() or [""]
        if header.split("\t") != ["id", "turn1", "turn2", "turn3", "label"]:
            raise EmorecError(f"{path}: the header is {header!r}, not id, turn1, turn2, turn3, label (tab-separated)")
        for number, line in enumerate(lines, 2):
            fields = line.split("\t")
            if not line.strip():
                continue  # a trailing blank line is not a row
            if len(fields) != 5:
                bad(f"{path}:{number}", f"{len(fields)} tab-separated fields, not 5")
                continue
            conversation, first, second, third, label = fields
            turns = [("user", first, None), ("agent", second, None), ("user", third, label)]
            rows = [
                Row(f"{path}:{number}", f"{conversation}_{k}", who, text, raw)
                for k, (who, text, raw) in enumerate(turns)
            ]
            examples += dialogue_examples(conversation, rows, index, bad)
        out[split] = examples
    return bad.splits(labels, **out)


# --- DailyDialog --------------------------------------------------------------------------------

DAILYDIALOG_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


def load_dailydialog(
    labels: list[str],
    data_dir: str | None = None,
    archive: str | list[str] | None = None,
    sha256: dict | None = None,
    verify: str = "warn",
    raw_labels: list | None = None,
    on_bad_row: str = "error",
) -> Splits:
    """DailyDialog's split files, {train,validation,test}/dialogues_{split}.txt (a dialogue per
    line, utterances ended by __eou__) and dialogues_emotion_{split}.txt (one label 0-6 per
    utterance). The dialogues are dyadic and alternate, so the speakers are written A and B.
    A dialogue whose utterance and label counts differ is a bad row (train has one)."""
    files = [f"{d}/dialogues{kind}_{d}.txt" for d in DAILYDIALOG_SPLITS.values() for kind in ("", "_emotion")]
    folder = locate("dailydialog", files, data_dir, archive=archive, sha256=sha256, verify=verify)
    index = LabelIndex(labels, raw_labels if raw_labels is not None else list(range(len(labels))))
    bad = BadRows("dailydialog", on_bad_row)
    out = {}
    for split, d in DAILYDIALOG_SPLITS.items():
        text_path, label_path = folder / f"{d}/dialogues_{d}.txt", folder / f"{d}/dialogues_emotion_{d}.txt"
        texts, golds = read_text(text_path, lines=True).splitlines(), read_text(label_path, lines=True).splitlines()
        if len(texts) != len(golds):
            raise EmorecError(
                f"{text_path} has {len(texts)} dialogues but {label_path} has {len(golds)}; use the release's own pair"
            )
        examples = []
        for n, (line, gold) in enumerate(zip(texts, golds), 1):
            utterances = line.split("__eou__")
            if utterances and not utterances[-1].strip():
                utterances.pop()  # the line ends with __eou__
            emotions = gold.split()
            if len(utterances) != len(emotions):
                bad(f"{text_path}:{n}", f"{len(utterances)} utterances but {len(emotions)} labels in {label_path.name}")
                continue
            rows = [
                Row(f"{text_path}:{n} utterance {u}", f"{split}{n}_u{u}", "AB"[u % 2], text, emotion)
                for u, (text, emotion) in enumerate(zip(utterances, emotions))
            ]
            examples += dialogue_examples(f"{split}{n}", rows, index, bad)
        out[split] = examples
    return bad.splits(labels, **out)


# --- M3ED (Chinese TV dialogues) ----------------------------------------------------------------

M3ED_SPLITS = {"train": "train", "dev": "val", "test": "test"}


def load_m3ed(
    labels: list[str],
    raw_labels: list | None = None,
    data_dir: str | None = None,
    on_bad_row: str = "error",
) -> Splits:
    """M3ED's official annotation.json ({movie: {dialogue: {SpeakerInfo, Dialog: {utterance id:
    {Speaker, Text, EmoAnnotation: {final_main_emo}}}}}}) with the official movie-level split
    in splitInfo/movie_list_{train,val,test}.txt. No public download (access on request)."""
    files = ["annotation.json"] + [f"splitInfo/movie_list_{s}.txt" for s in M3ED_SPLITS.values()]
    source = "M3ED is released on request by its authors (github.com/aim3-ruc/RUCM3ED), not by a public URL"
    folder = locate("m3ed", files, data_dir, source=source)
    index, bad = LabelIndex(labels, raw_labels), BadRows("m3ed", on_bad_row)
    movie_split = {}
    for split, name in M3ED_SPLITS.items():
        for movie in read_text(folder / f"splitInfo/movie_list_{name}.txt").split():
            movie_split[movie] = split
    path = folder / "annotation.json"
    annotation = read_json(path)
    if not isinstance(annotation, dict):
        raise EmorecError(f"{path}: expected a JSON object of movies; is this M3ED's annotation.json?")
    out = {s: [] for s in SPLITS}
    for movie, dialogues in annotation.items():
        split = movie_split.get(movie)
        if split is None:
            bad(f"{path}: movie {movie}", "is in no splitInfo/movie_list_*.txt")
            continue
        for dialogue, content in dialogues.items():
            speakers = content.get("SpeakerInfo", {})
            rows = []
            for uid, u in sorted(content.get("Dialog", {}).items(), key=lambda kv: int_or_text(kv[0].split("_")[-1])):
                where = f"{path}: {movie}/{dialogue}/{uid}"
                label = (u.get("EmoAnnotation") or {}).get("final_main_emo")
                if label is None or "Text" not in u:
                    bad(where, "missing Text or EmoAnnotation.final_main_emo")
                    continue
                speaker = (speakers.get(u.get("Speaker")) or {}).get("Name") or u.get("Speaker")
                rows.append(Row(where, uid, speaker, u["Text"], label))
            out[split] += dialogue_examples(f"{movie}/{dialogue}", rows, index, bad)
    return bad.splits(labels, **out)


# --- IEMOCAP (a local copy of the official release) ---------------------------------------------

_TRANSCRIPT = re.compile(r"^(\S+) \[(\d+(?:\.\d+)?)-(\d+(?:\.\d+)?)\]:\s*(.*)$")
_EVALUATION = re.compile(r"^\[[\d.]+ - [\d.]+\]\t(\S+)\t(\S+)\t")


def load_iemocap(
    labels: list[str],
    raw_labels: list,
    data_dir: str | None = None,
    test_sessions: list[int] = (5,),
    dev_fraction: float = 0.1,
    on_bad_row: str = "error",
) -> Splits:
    """IEMOCAP from the official release's own layout (IEMOCAP_full_release/Session{1..5}/
    dialog/transcriptions/*.txt and dialog/EmoEvaluation/*.txt), in the 6-class setting of the
    conversation literature (happy, sad, neutral, angry, excited, frustrated). Utterances with
    any other category (xxx, sur, fea, dis, oth) are context only. Test: session 5; dev: a
    fixed `dev_fraction` of the other sessions' dialogues, chosen by a hash of their names."""
    files = [f"Session{s}/dialog/transcriptions" for s in range(1, 6)]
    if data_dir is None:
        raise EmorecError(
            "IEMOCAP is licensed per user (sail.usc.edu/iemocap) and never downloaded; "
            "set dataset.data_dir to your IEMOCAP_full_release folder"
        )
    folder = Path(data_dir).expanduser()
    missing = [f for f in files if not (folder / f).is_dir()]
    if missing:
        raise EmorecError(f"dataset.data_dir={folder} lacks {missing[0]}; point it at IEMOCAP_full_release")
    index, bad = LabelIndex(labels, raw_labels), BadRows("iemocap", on_bad_row)
    out = {s: [] for s in SPLITS}
    for session in range(1, 6):
        for transcript in sorted((folder / f"Session{session}/dialog/transcriptions").glob("*.txt")):
            dialogue = transcript.stem
            evaluation = transcript.parent.parent / "EmoEvaluation" / transcript.name
            if not evaluation.is_file():
                bad(str(transcript), f"no {evaluation.name} in EmoEvaluation/")
                continue
            emotions = {}
            for line in read_text(evaluation).splitlines():
                if m := _EVALUATION.match(line):
                    emotions[m.group(1)] = m.group(2)
            turns = []
            for n, line in enumerate(read_text(transcript).splitlines(), 1):
                if m := _TRANSCRIPT.match(line.strip()):
                    turn, start, _, text = m.groups()
                    speaker = turn.rsplit("_", 1)[-1][:1]  # Ses01F_impro01_F000 -> F
                    turns.append((float(start), Row(f"{transcript}:{n}", turn, speaker, text, emotions.get(turn))))
            rows = [row for _, row in sorted(turns, key=lambda t: t[0])]  # the file is not in time order
            # Categories outside the 6 classes are not errors: those utterances are context only.
            outside = {
                str(r.label).lower(): f"category outside the {len(labels)} classes"
                for r in rows
                if r.label is not None and index.get(r.label) is None
            }
            split = "test" if session in test_sessions else ("dev" if in_holdout(dialogue, dev_fraction) else "train")
            out[split] += dialogue_examples(dialogue, rows, index, bad, outside)
    return bad.splits(labels, **out)
