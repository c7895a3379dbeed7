"""Every dataset option: its loader on a fixture in the official format, its bad data, and (with
EMOREC_DATA_DIR) the real files against the counts of the datasets README. Downloads:
test_downloads.py."""

import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from emorec.errors import EmorecError, instantiate
from tests.conftest import DATASET_FOLDER
from tests.dataset_fixtures import IEMOCAP_DIALOGUES

CONF = str(Path(__file__).parent.parent / "conf")
FOLDER = DATASET_FOLDER


def load(option: str, data_dir: Path | None, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[f"dataset={option}", *overrides])
    if data_dir is not None:
        cfg.dataset.data_dir = str(data_dir)
    return instantiate(cfg.dataset.load), cfg


def sizes(data) -> list[int]:
    return [len(data.train), len(data.dev), len(data.test)]


def words(data, split: str) -> list[str]:
    return [data.labels[ex.label] for ex in data[split]]


# --- each loader on its fixture -----------------------------------------------------------------


def test_emorynlp(fixture_dir):
    data, _ = load("emorynlp", fixture_dir("emorynlp"))
    assert sizes(data) == [4, 2, 2]
    assert words(data, "train") == ["neutral", "joyful", "mad", "scared"]
    second, third, fourth = data.train[1:4]
    assert second.speaker == "Bob Ray" and second.context == (("Ann Lee", "Morning, everyone."),)
    assert third.context == ()  # a new scene is a new dialogue
    assert fourth.speaker == "Ann Lee and Bob Ray"


def test_friends_leaves_out_non_neutral_but_keeps_it_as_context(fixture_dir):
    data, cfg = load("friends", fixture_dir("friends"))
    assert sizes(data) == [4, 2, 2]
    assert sum(data.left_out.values()) == 2 and "non-neutral" in next(iter(data.left_out))
    first, out = data.train[0], data.train[1]
    assert first.text == "I'm home!"  # the release's \x92 apostrophe, normalised
    assert out.text == "Out." and out.context == (("Ann", "I'm home!"), ("Bob", "Where were you?"))
    assert cfg.dataset.metric == "macro_f1"


def test_mastodon(fixture_dir):
    data, _ = load("mastodon", fixture_dir("mastodon"))
    assert sizes(data) == [3, 2, 3]
    assert words(data, "train") == ["positive", "negative", "neutral"]
    assert data.test[1].context == ((None, "servers are down"),) and data.test[2].context == ()


def test_emocontext_classifies_the_third_turn_with_two_turns_of_context(fixture_dir):
    data, _ = load("emocontext", fixture_dir("emocontext"))
    assert sizes(data) == [2, 1, 2]
    assert words(data, "train") == ["happy", "neutral"] and words(data, "test") == ["angry", "neutral"]
    assert data.train[0].text == "i got the job!!" and data.train[0].speaker == "user"
    assert data.train[0].context == (("user", "you there?"), ("agent", "yes, here"))
    assert data.train[1].context[0] == ("user", 'he said "no"')  # quotes are text, not csv quoting


def test_emocontext_bad_line_names_file_and_line(fixture_dir):
    folder = fixture_dir("emocontext")
    with open(folder / "dev.txt", "a", encoding="utf-8") as f:
        f.write("5\tonly two\tfields\n")
    with pytest.raises(EmorecError, match=r"dev.txt:3: 3 tab-separated fields, not 5; fix the row"):
        load("emocontext", folder)
    data, _ = load("emocontext", folder, "dataset.on_bad_row=skip")
    assert data.skipped == 1 and sizes(data) == [2, 1, 2]
    (folder / "test.txt").write_text("")
    with pytest.raises(EmorecError, match=r"test.txt: the header is '', not id, turn1, turn2, turn3, label"):
        load("emocontext", folder, "dataset.on_bad_row=skip")


@pytest.mark.parametrize(
    "option,expected,first", [("sst5", [5, 2, 3], "very positive"), ("sst2", [3, 2, 2], "positive")]
)
def test_sst(fixture_dir, option, expected, first):
    data, _ = load(option, fixture_dir(option))
    assert sizes(data) == expected and words(data, "train")[0] == first
    assert data.train[0].text == "a wonderful , moving film ."
    assert all(ex.context == () for ex in data.train)  # sentences, not dialogues


def test_mosi_thresholds(fixture_dir):
    folder = fixture_dir("mosi2")
    two, _ = load("mosi2", folder)
    assert sizes(two) == [4, 2, 3]
    # Clips of a video in clip order (10 after 2), the score 0 clip positive (MMSA's Has0).
    assert [ex.id for ex in two.train[:3]] == ["vidA_1", "vidA_2", "vidA_10"]
    assert words(two, "train") == ["positive", "negative", "positive", "negative"]
    non_zero, _ = load("mosi2", folder, "dataset.load.zero=drop")
    assert sizes(non_zero) == [3, 2, 2] and sum(non_zero.left_out.values()) == 2
    three, _ = load("mosi3", folder)
    assert words(three, "train") == ["positive", "negative", "neutral", "negative"]
    banded, _ = load("mosi3", folder, "dataset.load.neutral_band=0.5")
    assert words(banded, "train")[3] == "neutral"  # -0.4 is within MMSA's rounding band
    # A setting with no meaning is told in one line, before the files are looked for.
    for bad in ("dataset.load.classes=5", "dataset.load.zero=neutral"):
        with pytest.raises(EmorecError, match="use classes 2 or 3 and zero positive, negative or drop"):
            load("mosi2", Path("/nonexistent"), bad)


def test_dailydialog(fixture_dir):
    data, cfg = load("dailydialog", fixture_dir("dailydialog"))
    assert sizes(data) == [5, 2, 3]
    assert words(data, "train") == ["neutral", "happiness", "happiness", "neutral", "anger"]
    third = data.train[2]
    assert third.speaker == "A" and [s for s, _ in third.context] == ["A", "B"]
    assert cfg.dataset.metric == "micro_f1_no_neutral"


def test_chsims(fixture_dir):
    data, _ = load("chsims", fixture_dir("chsims"))
    assert sizes(data) == [3, 2, 2]
    assert [ex.text for ex in data.train[:2]] == ["我不太高兴。", "今天天气真好。"]  # clip order
    assert words(data, "train") == ["negative", "positive", "negative"]  # 0.0 -> negative (MMSA)
    assert data.train[1].context == ((None, "我不太高兴。"),)
    text_only, _ = load("chsims", fixture_dir("chsims"), "dataset.load.score_column=label_T")
    assert words(text_only, "train")[2] == "positive"  # label_T is 0.2


def test_m3ed(fixture_dir):
    data, cfg = load("m3ed", fixture_dir("m3ed"))
    assert sizes(data) == [3, 1, 2]
    first, second = data.train[:2]
    assert (first.text, first.speaker, data.labels[first.label]) == ("我来了。", "小红", "neutral")
    assert second.context == (("小红", "我来了。"),) and data.labels[second.label] == "happy"
    assert cfg.dataset.metric == "weighted_f1"


def test_iemocap(fixture_dir):
    folder = fixture_dir("iemocap")
    data, _ = load("iemocap", folder)
    # The held-out dev, pinned for this fixture's dialogue names: none of the four at 10%, two at 50%.
    assert sizes(data) == [24, 0, 6]
    half, _ = load("iemocap", folder, "dataset.load.dev_fraction=0.5")
    assert sizes(half) == [12, 12, 6]
    assert sorted({ex.dialogue_id for ex in half.dev}) == ["Ses03F_script01_1", "Ses04M_impro02"]
    assert {ex.dialogue_id for ex in half.train} == {IEMOCAP_DIALOGUES[1], IEMOCAP_DIALOGUES[2]}
    test = data.test
    assert [ex.text for ex in test[:2]] == ["Excuse me, is this the line?", "Yes. Take a number."]  # time order
    assert [data.labels[ex.label] for ex in test] == ["neutral", "frustrated", "angry", "excited", "happy", "sad"]
    assert test[1].speaker == "M" and test[1].context == (("F", "Excuse me, is this the line?"),)
    assert sum(data.left_out.values()) == 5  # one "sur" turn per dialogue: context only


# --- bad data -----------------------------------------------------------------------------------


def test_missing_file_names_it(fixture_dir):
    folder = fixture_dir("mastodon")
    (folder / "dev.json").unlink()
    with pytest.raises(EmorecError, match=r"dataset.data_dir=.* lacks dev.json"):
        load("mastodon", folder)


def test_missing_column(fixture_dir):
    folder = fixture_dir("emorynlp")
    path = folder / "emorynlp_dev_final.csv"
    path.write_text(path.read_text().replace("Emotion", "Feeling", 1))
    with pytest.raises(EmorecError, match=r"emorynlp_dev_final.csv: missing column\(s\) Emotion"):
        load("emorynlp", folder)


def test_label_outside_set_and_skip(fixture_dir):
    folder = fixture_dir("mastodon")
    path = folder / "train.json"
    path.write_text(path.read_text().replace('"sentiment": "-"', '"sentiment": "?"'))
    with pytest.raises(EmorecError, match=r"train.json: dialogue 0 utterance 1: label '\?' is not one of"):
        load("mastodon", folder)
    data, _ = load("mastodon", folder, "dataset.on_bad_row=skip")
    assert len(data.train) == 2 and data.skipped == 1


def test_empty_utterance(fixture_dir):
    folder = fixture_dir("friends")
    path = folder / "friends_dev.json"
    path.write_text(path.read_text().replace('"I quit."', '"  "'))
    with pytest.raises(
        EmorecError, match=r"friends_dev.json: dialogue 0 utterance 1: empty utterance; .*on_bad_row=skip"
    ):
        load("friends", folder)


def test_dialogue_with_more_utterances_than_labels(fixture_dir):
    folder = fixture_dir("dailydialog")
    path = folder / "train/dialogues_train.txt"
    path.write_text(path.read_text().replace("That makes me so angry . __eou__", "So angry . __eou__ Really . __eou__"))
    with pytest.raises(EmorecError, match=r"dialogues_train.txt:2: 3 utterances but 2 labels"):
        load("dailydialog", folder, "dataset.on_bad_row=error")
    data, _ = load("dailydialog", folder)  # the config skips by default: the release has one such dialogue
    assert len(data.train) == 3 and data.skipped == 1  # the whole dialogue, counted


def test_undecodable_bytes(fixture_dir):
    folder = fixture_dir("sst5")
    path = folder / "stsa.fine.test"
    path.write_bytes(path.read_bytes().replace(b"unwatchable", b"unwatch\xffable"))
    with pytest.raises(EmorecError, match=r"stsa.fine.test: line 2 is not valid UTF-8"):
        load("sst5", folder)


def test_broken_json_and_missing_field(fixture_dir):
    folder = fixture_dir("friends")
    path = folder / "friends_test.json"
    path.write_text(path.read_text()[:-10])
    with pytest.raises(EmorecError, match=r"friends_test.json: line \d+ is not valid JSON"):
        load("friends", folder)
    folder = fixture_dir("mastodon")
    path = folder / "dev.json"
    path.write_text(path.read_text().replace('"sentiment": "*"', '"mood": "*"'))
    with pytest.raises(EmorecError, match=r"dev.json: dialogue 0 utterance 1: missing field\(s\) sentiment"):
        load("mastodon", folder)


def test_score_not_a_number(fixture_dir):
    folder = fixture_dir("mosi2")
    path = folder / "label.csv"
    path.write_text(path.read_text().replace("-1.8", "n/a"))
    with pytest.raises(EmorecError, match=r"label.csv:3: score 'n/a' is not a number"):
        load("mosi2", folder)


def test_m3ed_movie_outside_the_split(fixture_dir):
    folder = fixture_dir("m3ed")
    (folder / "splitInfo/movie_list_val.txt").write_text("")
    with pytest.raises(EmorecError, match=r"annotation.json: movie showB: is in no splitInfo"):
        load("m3ed", folder)


@pytest.mark.parametrize(
    "option,needle",
    [
        ("chsims", "github.com/thuiar/MMSA"),
        ("m3ed", "RUCM3ED"),
        ("iemocap", "IEMOCAP_full_release"),
        ("emocontext", "SemEval-2019 Task 3"),
    ],
)
def test_undownloadable_datasets_say_where_data_comes_from(option, needle):
    with pytest.raises(EmorecError) as e:
        load(option, None)
    assert needle in str(e.value) and "dataset.data_dir" in str(e.value) and "\n" not in str(e.value)


# --- the real files (EMOREC_DATA_DIR), against the datasets README --------------------------------

REAL = {
    "meld": [9989, 1109, 2610],
    "meld_sentiment": [9989, 1109, 2610],
    "emorynlp": [7551, 954, 984],
    "mastodon": [967, 108, 1142],
    "sst2": [6920, 872, 1821],
    "sst5": [8544, 1101, 2210],
    "mosi2": [1281, 229, 685],
    "mosi3": [1281, 229, 685],
}
real_data = pytest.mark.skipif(not os.environ.get("EMOREC_DATA_DIR"), reason="real data needs EMOREC_DATA_DIR")


def _real(option: str, *overrides: str):
    folder = Path(os.environ["EMOREC_REAL_DATA_DIR"]) / FOLDER.get(option, option)
    return load(option, folder, *overrides)


@real_data
@pytest.mark.parametrize("option", list(REAL))
def test_real_files_match_readme(option):
    data, cfg = _real(option)
    assert sizes(data) == REAL[option] and data.skipped == 0
    for split in ("train", "dev", "test"):
        assert set(words(data, split)) == set(cfg.dataset.labels), split


@real_data
def test_real_friends_counts_include_the_left_out_utterances():
    data, cfg = _real("friends")
    assert sum(sizes(data)) + sum(data.left_out.values()) == 10561 + 1178 + 2764
    for split in ("train", "dev", "test"):
        assert set(words(data, split)) == set(cfg.dataset.labels)


@real_data
def test_real_dailydialog_has_one_mismatched_dialogue():
    with pytest.raises(EmorecError, match=r"dialogues_train.txt:7852: 12 utterances but 11 labels"):
        _real("dailydialog", "dataset.on_bad_row=error")
    data, cfg = _real("dailydialog")
    assert data.skipped == 1
    assert sizes(data) == [87170 - 11, 8069, 7740]  # the README counts that dialogue's 11 labels
    for split in ("train", "dev", "test"):
        assert set(words(data, split)) == set(cfg.dataset.labels)


# --- the data reaches a run: metric of record, context, inferred labels --------------------------


def test_run_on_dailydialog_with_context_records_micro_f1(make_cfg, fixture_dir):
    from emorec.run import run

    cfg = make_cfg("dataset=dailydialog", f"dataset.data_dir={fixture_dir('dailydialog')}", "dataset.context_window=2")
    metrics = run(cfg)
    saved = json.loads((Path(cfg.output_dir) / "metrics.json").read_text())
    assert saved["metric"] == "micro_f1_no_neutral" and 0 <= saved["test"]["micro_f1_no_neutral"] <= 1
    assert saved["data"]["context_window"] == 2 and saved["data"]["labels"][0] == "neutral"
    assert metrics["test"]["n"] == 3
