"""A user's own data: dataset=csv and dataset=jsonl files, and dataset=hf on datasets built here
(parquet files, a save_to_disk folder, ClassLabel features); nothing from the network."""

import csv
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from emorec.errors import EmorecError, instantiate

CONF = str(Path(__file__).parent.parent / "conf")


def load(option: str, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[f"dataset={option}", *overrides])
    return instantiate(cfg.dataset.load)


def sizes(data) -> list[int]:
    return [len(data.train), len(data.dev), len(data.test)]


def _rows():
    return [
        {"text": "hello there", "label": "calm", "dialogue": "d1", "speaker": "ann", "split": "train", "turn": 2},
        {"text": "go away", "label": "upset", "dialogue": "d1", "speaker": "bob", "split": "train", "turn": 1},
        {"text": "lovely day", "label": "calm", "dialogue": "d2", "speaker": "ann", "split": "train", "turn": 1},
        {"text": "stop it", "label": "upset", "dialogue": "d3", "speaker": "bob", "split": "dev", "turn": 1},
        {"text": "all fine", "label": "calm", "dialogue": "d4", "speaker": "cal", "split": "test", "turn": 1},
        {"text": "ugh, no", "label": "", "dialogue": "d4", "speaker": "ann", "split": "test", "turn": 2},
        {"text": "why?", "label": "upset", "dialogue": "d4", "speaker": "cal", "split": "test", "turn": 3},
    ]


def write_table(path: Path, rows: list[dict], delimiter: str = ",", header: bool = True) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({**r, "label": r["label"] or None}) + "\n" for r in rows))
        return path
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        if header:
            writer.writerow(list(rows[0]))
        writer.writerows([list(r.values()) for r in rows])
    return path


DIALOGUES = ["dataset.load.columns.dialogue=dialogue", "dataset.load.columns.speaker=speaker"]
DIALOGUES += ["dataset.load.columns.order=turn"]


def check_dialogue_rows(data) -> None:
    """What _rows() with its dialogue, speaker and order columns gives."""
    assert data.labels == ["calm", "upset"]  # inferred from train, sorted
    assert sizes(data) == [3, 1, 2]
    assert [ex.text for ex in data.train[:2]] == ["go away", "hello there"]  # order column
    assert data.train[1].context == (("bob", "go away"),)
    # An unlabelled row is context only, and counted.
    assert data.test[1].context == (("cal", "all fine"), ("ann", "ugh, no")) and sum(data.left_out.values()) == 1


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_own_data_one_file_with_splits(tmp_path, fmt):
    path = write_table(tmp_path / f"data.{fmt}", _rows())
    check_dialogue_rows(load(fmt, f"dataset.load.data_files={path}", "dataset.load.columns.split=split", *DIALOGUES))


@pytest.mark.parametrize("delimiter", ["\t", ";"])
def test_csv_with_another_delimiter(tmp_path, delimiter):
    path = write_table(tmp_path / "data.tsv", _rows(), delimiter)
    args = [f"dataset.load.data_files={path}", "dataset.load.columns.split=split", *DIALOGUES]
    check_dialogue_rows(load("csv", *args, f"dataset.load.delimiter='{delimiter}'"))
    # Named .csv and read as comma-separated, the file has one column; the error says what to set.
    other = write_table(tmp_path / "data.csv", _rows(), delimiter)
    args = [f"dataset.load.data_files={other}", "dataset.load.columns.split=split", *DIALOGUES]
    with pytest.raises(EmorecError, match=r"missing column\(s\) text, label.*set dataset.load.delimiter"):
        load("csv", *args)


def test_csv_without_header_by_position(tmp_path):
    path = write_table(tmp_path / "data.csv", _rows(), header=False)
    args = ["dataset.load.header=false", "dataset.load.columns.text=0", "dataset.load.columns.label=1"]
    args += ["dataset.load.columns.dialogue=2", "dataset.load.columns.speaker=3", "dataset.load.columns.split=4"]
    data = load("csv", f"dataset.load.data_files={path}", *args, "dataset.load.columns.order=5")
    check_dialogue_rows(data)
    assert data.train[0].id == "data.csv:2"  # line numbers count from the first row, as written
    with pytest.raises(EmorecError, match=r"missing column\(s\) 9; rows have 6 columns \(0 to 5\)"):
        load("csv", f"dataset.load.data_files={path}", *args, "dataset.load.columns.order=9")


def test_own_data_files_per_split_fixed_labels_and_dev_holdout(tmp_path):
    rows = [{"text": f"utterance {i}", "label": ["b", "a"][i % 2]} for i in range(40)]
    (tmp_path / "train").mkdir()
    train, test = write_table(tmp_path / "train" / "data.csv", rows), write_table(tmp_path / "test.csv", rows[:4])
    files = f"dataset.load.data_files={{train: {train}, test: {test}}}"
    data = load("csv", files, "dataset.labels=[b,a]")
    # The fixed order maps b to 0 and a to 1, in whichever rows the dev holdout leaves in train.
    gold = {r["text"]: ["b", "a"].index(r["label"]) for r in rows}
    assert data.labels == ["b", "a"] and [ex.label for ex in data.train] == [gold[ex.text] for ex in data.train]
    assert {ex.label for ex in data.train} == {0, 1}
    held = ["utterance 14", "utterance 17", "utterance 28", "utterance 34"]  # pinned: a hash of file name and line
    assert [ex.text for ex in data.dev] == held and len(data.train) + len(data.dev) == 40
    # The holdout does not depend on the folder the file is in.
    moved = tmp_path / "elsewhere" / "data.csv"
    moved.parent.mkdir()
    moved.write_bytes(train.read_bytes())
    again = load("csv", f"dataset.load.data_files={{train: {moved}, test: {test}}}", "dataset.labels=[b,a]")
    assert [ex.text for ex in again.dev] == held
    assert all(ex.context == () for ex in data.train)  # no dialogue column: no context


def test_own_data_errors(tmp_path):
    path = write_table(tmp_path / "data.csv", _rows())
    with pytest.raises(EmorecError, match="needs dataset.load.columns.split"):
        load("csv", f"dataset.load.data_files={path}")
    with pytest.raises(EmorecError, match=r"missing column\(s\) feeling"):
        load(
            "csv",
            f"dataset.load.data_files={path}",
            "dataset.load.columns.split=split",
            "dataset.load.columns.label=feeling",
        )
    rows = _rows()
    rows[0]["split"] = "holdout"
    bad = write_table(tmp_path / "data.csv", rows)
    with pytest.raises(EmorecError, match=r"data.csv:2: split 'holdout' is not train, dev or test"):
        load("csv", f"dataset.load.data_files={bad}", "dataset.load.columns.split=split")
    with pytest.raises(EmorecError, match="does not exist"):
        load("jsonl", f"dataset.load.data_files={{train: {tmp_path / 'nope.jsonl'}, test: {path}}}")
    with pytest.raises(EmorecError, match="unknown key.*wording; use text, label"):
        load("csv", f"dataset.load.data_files={path}", "+dataset.load.columns.wording=x")


def test_multi_label_rows(tmp_path):
    rows = [{"text": f"row {i}", "label": ["joy"] if i % 2 else ["anger"]} for i in range(8)]
    rows[3]["label"] = ["joy", "anger"]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = f"dataset.load.data_files={{train: {path}, dev: {path}, test: {path}}}"
    with pytest.raises(EmorecError, match=r"train.jsonl:4: 2 labels \['joy', 'anger'\].*dataset.multi_label=first"):
        load("jsonl", files)
    first = load("jsonl", files, "dataset.multi_label=first")
    assert len(first.train) == 8 and first.labels[first.train[3].label] == "joy"
    dropped = load("jsonl", files, "dataset.multi_label=drop")
    assert len(dropped.train) == 7 and dropped.left_out == {"several labels (dataset.multi_label=drop)": 3}


# --- dataset=hf ---------------------------------------------------------------------------------


@pytest.fixture
def hf(tmp_path, monkeypatch):
    """`datasets` with its cache in the test's folder and the hub offline (as without a network)."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return datasets


def emotion_splits(datasets, sizes=(30, 4, 5)):
    """A dataset in the shape of the hub's emotion datasets: text and a ClassLabel."""
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["sadness", "joy", "anger"])}
    )

    def split(name, n):
        return datasets.Dataset.from_dict(
            {"text": [f"{name} sentence {i}" for i in range(n)], "label": [i % 3 for i in range(n)]}, features=features
        )

    return datasets.DatasetDict({n: split(n, k) for n, k in zip(["train", "validation", "test"], sizes)})


def test_hf_save_to_disk_folder_with_class_labels(hf, tmp_path):
    emotion_splits(hf).save_to_disk(tmp_path / "emotion")
    data = load("hf", f"dataset.load.path={tmp_path / 'emotion'}")
    assert data.labels == ["sadness", "joy", "anger"]  # the ClassLabel's names, in index order
    assert sizes(data) == [30, 4, 5]  # validation is the dev split
    assert data.test[4].text == "test sentence 4" and data.labels[data.test[4].label] == "joy"
    reworded = load("hf", f"dataset.load.path={tmp_path / 'emotion'}", "dataset.labels=[sad,happy,angry]")
    assert reworded.labels == ["sad", "happy", "angry"] and reworded.test[4].label == 1
    with pytest.raises(EmorecError, match="dataset.labels has 2 names for the 3 classes.*sadness, joy, anger"):
        load("hf", f"dataset.load.path={tmp_path / 'emotion'}", "dataset.labels=[sad,happy]")


def test_hf_parquet_files_with_text_labels_and_a_held_out_dev(hf, tmp_path):
    for name, n in [("train", 40), ("test", 6)]:
        labels = ["pos" if i % 2 else "neg" for i in range(n)]
        hf.Dataset.from_dict({"sentence": [f"{name} {i}" for i in range(n)], "feeling": labels}).to_parquet(
            tmp_path / f"{name}.parquet"
        )
    files = f"dataset.load.data_files={{train: {tmp_path / 'train.parquet'}, test: {tmp_path / 'test.parquet'}}}"
    columns = ["dataset.load.columns.text=sentence", "dataset.load.columns.label=feeling"]
    data = load("hf", "dataset.load.path=parquet", files, *columns)
    held = [7, 12, 38]  # pinned: a hash of the builder, split and row
    assert data.labels == ["neg", "pos"] and sizes(data) == [40 - len(held), len(held), 6]
    assert [ex.text for ex in data.dev] == [f"train {i}" for i in held]
    with pytest.raises(
        EmorecError,
        match=r"no column\(s\) text, label \(it has sentence, feeling\); set dataset.load.columns.text=\.\.\. ",
    ):
        load("hf", "dataset.load.path=parquet", files)
    with pytest.raises(EmorecError, match=r"has no split 'valid' \(it has train, test\).*dataset.load.splits.dev"):
        load("hf", "dataset.load.path=parquet", files, *columns, "dataset.load.splits.dev=valid")


def test_hf_dialogues_and_a_split_column(hf, tmp_path):
    """One file of csv rows through the csv builder, routed by a split column, in dialogues."""
    path = write_table(tmp_path / "all.csv", _rows())
    args = ["dataset.load.path=csv", f"dataset.load.data_files={path}", "dataset.load.columns.split=split"]
    check_dialogue_rows(load("hf", *args, *DIALOGUES))


def test_hf_integer_labels_need_names(hf, tmp_path):
    hf.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 1, 1, 0]}).save_to_disk(tmp_path / "ints")
    args = [f"dataset.load.path={tmp_path / 'ints'}", "dataset.load.splits.test=train"]
    with pytest.raises(EmorecError, match=r"integers without names; name them in index order with dataset.labels="):
        load("hf", *args)
    data = load("hf", *args, "dataset.labels=[no,yes]")
    assert data.labels == ["no", "yes"] and [ex.label for ex in data.test] == [0, 1, 1, 0]


def test_hf_multi_label_rows(hf, tmp_path):
    feature = hf.Sequence(hf.ClassLabel(names=["joy", "anger", "fear"]))
    rows = {"text": [f"t{i}" for i in range(6)], "labels": [[0], [1], [0, 2], [2], [], [1, 0]]}
    features = hf.Features({"text": hf.Value("string"), "labels": feature})
    hf.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "multi")
    args = [
        f"dataset.load.path={tmp_path / 'multi'}",
        "dataset.load.splits.test=train",
        "dataset.load.columns.label=labels",
    ]
    with pytest.raises(EmorecError, match=r"multi:train:2: 2 labels \['joy', 'fear'\].*multi_label=first.*or drop"):
        load("hf", *args)
    first = load("hf", *args, "dataset.multi_label=first")
    assert first.labels == ["joy", "anger", "fear"] and [ex.label for ex in first.test] == [0, 1, 0, 2, 1]
    dropped = load("hf", *args, "dataset.multi_label=drop")
    assert [ex.text for ex in dropped.test] == ["t0", "t1", "t3"]


def test_hf_offline_with_nothing_cached_says_what_and_how(hf):
    with pytest.raises(EmorecError) as error:
        load("hf", "dataset.load.path=someone/missing-dataset", "dataset.load.name=sub")
    message = str(error.value)
    assert "\n" not in message and "path=someone/missing-dataset, name=sub" in message
    assert "not in the Hugging Face cache" in message and "point dataset.load.path at local files" in message


def test_run_on_own_csv_with_inferred_labels(make_cfg, tmp_path):
    from emorec.run import run

    path = write_table(tmp_path / "data.csv", _rows())
    files = f"dataset.load.data_files={path}"
    metrics = run(make_cfg("dataset=csv", files, "dataset.load.columns.split=split", "trainer.epochs=1"))
    assert metrics["data"]["labels"] == ["calm", "upset"] and metrics["test"]["n"] == 2
    assert metrics["data"]["left_out"] == {"no label (context only)": 1}
    assert "micro_f1_no_neutral" not in metrics["test"]


def test_run_on_a_hub_format_dataset(hf, make_cfg, tmp_path):
    """A whole run on dataset=hf: the tiny model trains on a save_to_disk folder."""
    from emorec.run import run

    emotion_splits(hf, (24, 6, 9)).save_to_disk(tmp_path / "emotion")
    metrics = run(make_cfg("dataset=hf", f"dataset.load.path={tmp_path / 'emotion'}", "trainer.epochs=1"))
    assert metrics["dataset"] == "hf" and metrics["data"]["labels"] == ["sadness", "joy", "anger"]
    assert metrics["val"]["n"] == 6 and metrics["test"]["n"] == 9 and metrics["train"]["steps"] == 6


@pytest.mark.parametrize("spelling", ["\\t", "tab", "TSV", None])
def test_a_tab_as_a_shell_passes_it_or_inferred_from_a_tsv_name(tmp_path, spelling):
    """bash passes "\\t" on as a backslash and a t; tab and tsv say the same; unset, a .tsv file
    is tab-separated."""
    path = write_table(tmp_path / "data.tsv", _rows(), "\t")
    args = [f"dataset.load.data_files={path}", "dataset.load.columns.split=split", *DIALOGUES]
    given = [] if spelling is None else [f"dataset.load.delimiter='{spelling}'"]
    check_dialogue_rows(load("csv", *args, *given))


def test_a_delimiter_of_several_characters_is_one_clear_line(tmp_path):
    path = write_table(tmp_path / "data.csv", _rows())
    args = [f"dataset.load.data_files={path}", "dataset.load.columns.split=split", "dataset.load.delimiter=';;'"]
    with pytest.raises(EmorecError, match=r"dataset.load.delimiter=';;' is not one character; use tab"):
        load("csv", *args)


def test_an_old_runs_comma_becomes_unset_unless_it_read_a_tsv():
    from emorec.upgrade import inferred_delimiter

    for files, expected in (("a.csv", None), ({"train": "a.tsv", "test": "b.tsv"}, ",")):
        cfg = {
            "dataset": {"load": {"_target_": "emorec.data.tables.load_table", "delimiter": ",", "data_files": files}}
        }
        inferred_delimiter(cfg)
        assert cfg["dataset"]["load"]["delimiter"] == expected


def test_every_jsonl_row_is_checked_for_its_fields(tmp_path):
    """Row 3 without its text: a bad row named by file and line (skippable), not a KeyError; a
    row without its label field has no label (context only); a field no row has is a column
    option that names nothing."""
    path = tmp_path / "train.jsonl"
    rows = [{"text": "fine", "label": "joy"}, {"text": "bad", "label": "anger"}, {"label": "joy"}]
    rows += [{"text": "no label here"}, {"text": "ok", "label": "anger"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test = write_table(tmp_path / "test.jsonl", [{"text": "t", "label": "joy"}])
    files = f"dataset.load.data_files={{train: {path}, dev: {path}, test: {test}}}"
    with pytest.raises(
        EmorecError, match=r"train.jsonl:3: missing field\(s\) text; fix the row or set dataset.on_bad_row"
    ):
        load("jsonl", files)
    data = load("jsonl", files, "dataset.on_bad_row=skip")
    assert [ex.text for ex in data.train] == ["fine", "bad", "ok"] and data.skipped == 2  # train and dev
    with pytest.raises(EmorecError, match=r"train.jsonl: no row has field\(s\) utterance; fix the data"):
        load("jsonl", files, "dataset.load.columns.text=utterance")


def test_label_ids_map_to_the_names_by_position(tmp_path, caplog):
    """A release whose label column holds ids: dataset.labels names them in id order (as
    dataset=hf maps a ClassLabel), said once in the log; an id past the names is one line."""
    train = tmp_path / "train.tsv"
    train.write_text("".join(f"utterance {i}\t{i % 3}\tid{i}\n" for i in range(12)))
    test = tmp_path / "test.tsv"
    test.write_text("good\t1\tt1\nbad\t0\tt2\n")
    files = [f"dataset.load.data_files={{train: {train}, dev: {train}, test: {test}}}", "dataset.load.header=false"]
    files += ["dataset.load.columns.text=0", "dataset.load.columns.label=1"]
    with caplog.at_level("INFO"):
        data = load("csv", *files, "dataset.labels=[sad,happy,calm]")
    assert [ex.label for ex in data.train[:4]] == [0, 1, 2, 0] and [ex.label for ex in data.test] == [1, 0]
    assert "the label column holds ids: 0 = sad, 1 = happy, 2 = calm" in caplog.text
    with pytest.raises(EmorecError, match="holds ids up to 2 but dataset.labels has 2 names; give one name per id"):
        load("csv", *files, "dataset.labels=[sad,happy]")
    # Names in the data are names, even where some look like numbers.
    assert load("csv", *files, "dataset.labels=['0','1','2']").labels == ["0", "1", "2"]


def test_one_file_without_a_split_column_holds_out_test_and_dev(tmp_path):
    """An older corpus's single file: test_fraction holds test out by a hash of each row's file
    name and line (the same wherever the file is), then dev_fraction of the rest; without it,
    one line says what to set."""
    rows = [{"text": f"utterance {i}", "label": "ab"[i % 2]} for i in range(200)]
    path = write_table(tmp_path / "all.csv", rows)
    with pytest.raises(EmorecError, match="needs dataset.load.columns.split .* or dataset.load.test_fraction=0.1"):
        load("csv", f"dataset.load.data_files={path}")
    data = load("csv", f"dataset.load.data_files={path}", "dataset.load.test_fraction=0.2")
    assert 20 <= len(data.test) <= 60 and 5 <= len(data.dev) <= 35
    texts = [{ex.text for ex in split} for split in (data.train, data.dev, data.test)]
    assert sum(map(len, texts)) == 200 and not (texts[0] & texts[2] or texts[1] & texts[2] or texts[0] & texts[1])
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    again = load(
        "csv", f"dataset.load.data_files={write_table(moved / 'all.csv', rows)}", "dataset.load.test_fraction=0.2"
    )
    assert [ex.text for ex in again.test] == [ex.text for ex in data.test]


NAMES = ["admiration", "amusement", "anger", "annoyance", "approval", "caring"]


def release_tsv(path: Path) -> Path:
    """A corpus's release as it comes: text<TAB>label ids<TAB>id, no header, some rows with
    several comma-joined ids."""
    ids = ["0", "1", "2", "0,5", "3", "4", "5", "1", "2,3", "3", "4", "5"]
    path.write_text("".join(f"utterance number {i}\t{v}\tr{i}\n" for i, v in enumerate(ids)))
    return path


def test_a_release_tsv_loads_with_the_documented_options(tmp_path, caplog):
    """Ids map to names by position; multi-id cells are multi-label rows, resolved as asked."""
    train, test = release_tsv(tmp_path / "train.tsv"), release_tsv(tmp_path / "test.tsv")
    args = [f"dataset.load.data_files={{train: {train}, dev: {train}, test: {test}}}", "dataset.load.header=false"]
    # A bare comma is Hydra's sweep syntax: quoted ("dataset.load.label_separator=','" in bash), or spelled.
    args += ["dataset.load.columns.text=0", "dataset.load.columns.label=1", "dataset.load.label_separator=comma"]
    args += [f"dataset.labels=[{','.join(NAMES)}]"]
    with pytest.raises(EmorecError, match=r"train.tsv:4: 2 labels \['0', '5'\].*dataset.multi_label=first"):
        load("csv", *args)
    assert (
        load("csv", *args[:-2], "dataset.load.label_separator=','", args[-1], "dataset.multi_label=first").labels
        == NAMES
    )
    first = load("csv", *args, "dataset.multi_label=first")
    assert [NAMES[ex.label] for ex in first.train][:5] == [
        "admiration",
        "amusement",
        "anger",
        "admiration",
        "annoyance",
    ]
    dropped = load("csv", *args, "dataset.multi_label=drop")
    assert len(dropped.train) == 10 and sum(dropped.left_out.values()) == 6  # 2 rows in each split
    # Without the separator and without names, "0,5" would be a class: said in a warning.
    plain = [a for a in args if "separator" not in a and "dataset.labels" not in a]
    with caplog.at_level("WARNING"):
        assert "0,5" in load("csv", *plain).labels
    assert "label value(s) '0,5', '2,3' look like several labels joined" in caplog.text
