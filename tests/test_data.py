"""MELD loading from every source: a named folder, EMOREC_DATA_DIR, a download, and the errors."""

import functools
import http.server
import os
import re
import shutil
import threading
from pathlib import Path

import pytest

from emorec.data.corpora import MELD_FILES, load_meld
from emorec.data.files import sha256_of
from emorec.data.records import normalise_text
from emorec.data.splits import subsample
from emorec.errors import EmorecError
from tests.meld_fixture import MELD_DIR

LABELS = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]


@pytest.mark.parametrize(
    "raw,clean",
    [
        ("he\x92s lost it", "he's lost it"),  # cp1252 byte read as Latin-1 (EmotionLines)
        ("donâ€™t", "don't"),  # UTF-8 read as cp1252
        ("I can’t — “really”…", 'I can\'t - "really"...'),
        ("  two   spaces\n", "two spaces"),
        ("café", "café"),
    ],
)
def test_normalise_text(raw, clean):
    assert normalise_text(raw) == clean


def test_load_meld_fixture():
    splits = load_meld(LABELS, data_dir=str(MELD_DIR))
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [16, 6, 8]
    first = splits["train"][0]
    assert first.text == "I can't believe you did that for me!"
    assert LABELS[first.label] == "joy" and first.speaker == "Ann" and first.id == "dia0_utt0"
    assert {ex.label for ex in splits["train"]} == set(range(7))


def test_sentiment_column():
    splits = load_meld(["neutral", "positive", "negative"], data_dir=str(MELD_DIR), column="Sentiment")
    assert splits["test"][1].label == 1  # "I love this song so much!" is positive


def test_subsample_is_seeded_and_ordered():
    items = list(range(100))
    a, b = subsample(items, 10, seed=3), subsample(items, 10, seed=3)
    assert a == b == sorted(a) and len(a) == 10
    assert subsample(items, 10, seed=4) != a
    assert subsample(items, None, seed=3) == items


def test_env_dir_is_used(tmp_path, monkeypatch):
    shutil.copytree(MELD_DIR, tmp_path / "meld")
    monkeypatch.setenv("EMOREC_DATA_DIR", str(tmp_path))
    assert len(load_meld(LABELS)["train"]) == 16


def test_missing_everywhere_lists_the_three_ways():
    with pytest.raises(EmorecError) as e:
        load_meld(LABELS, url=None)
    msg = str(e.value)
    assert "dataset.data_dir" in msg and "EMOREC_DATA_DIR" in msg and "download" in msg
    assert "\n" not in msg


def test_data_dir_missing_file(tmp_path):
    shutil.copy(MELD_DIR / "train_sent_emo.csv", tmp_path)
    with pytest.raises(EmorecError, match="lacks dev_sent_emo.csv, test_sent_emo.csv"):
        load_meld(LABELS, data_dir=str(tmp_path))


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving a copy of the fixture."""
    root = tmp_path / "served"
    shutil.copytree(MELD_DIR, root)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


def test_download_with_checksum_into_cache(http_server):
    url, root = http_server
    sums = {f: sha256_of(root / f) for f in MELD_FILES.values()}
    splits = load_meld(LABELS, url=url, sha256=sums)
    assert len(splits["train"]) == 16
    cached = Path(os.environ["EMOREC_CACHE_DIR"]) / "datasets" / "meld"
    assert sorted(p.name for p in cached.iterdir()) == sorted(MELD_FILES.values())
    # The second load reads the cache: it works with the server's files gone.
    shutil.rmtree(root)
    assert len(load_meld(LABELS, url=url, sha256=sums)["dev"]) == 6


def test_download_checksum_mismatch_leaves_nothing(http_server):
    url, root = http_server
    sums = {f: "0" * 64 for f in MELD_FILES.values()}
    cached = Path(os.environ["EMOREC_CACHE_DIR"]) / "datasets" / "meld"
    # The message names the folders it looked in; not even an empty cache folder is left.
    with pytest.raises(EmorecError, match=rf"meld data not found in {re.escape(str(cached))} \(.*checksum mismatch"):
        load_meld(LABELS, url=url, sha256=sums)
    assert not cached.exists()


def _bad_copy(tmp_path, old: str, new: str) -> Path:
    shutil.copytree(MELD_DIR, tmp_path / "bad")
    path = tmp_path / "bad" / "dev_sent_emo.csv"
    path.write_text(path.read_text().replace(old, new, 1))
    return tmp_path / "bad"


def test_bad_label_names_file_and_line(tmp_path):
    folder = _bad_copy(tmp_path, 'Thursday works.",Bob,neutral', 'Thursday works.",Bob,bored')
    with pytest.raises(EmorecError, match=r"dev_sent_emo.csv:2: label 'bored' is not one of"):
        load_meld(LABELS, data_dir=str(folder))
    # Skipping is opt-in, and counted.
    assert len(load_meld(LABELS, data_dir=str(folder), on_bad_row="skip")["dev"]) == 5


def test_empty_utterance_and_missing_column(tmp_path):
    folder = _bad_copy(tmp_path, "I got the job!", "")
    with pytest.raises(EmorecError, match=r"dev_sent_emo.csv:3: empty utterance"):
        load_meld(LABELS, data_dir=str(folder))
    path = folder / "test_sent_emo.csv"
    path.write_text(path.read_text().replace("Emotion", "Feeling", 1))
    with pytest.raises(EmorecError, match="missing column"):
        load_meld(LABELS, data_dir=str(folder), on_bad_row="skip")


def test_undecodable_bytes(tmp_path):
    shutil.copytree(MELD_DIR, tmp_path / "bad")
    path = tmp_path / "bad" / "test_sent_emo.csv"
    path.write_bytes(path.read_bytes().replace(b"pizza", b"pi\xffa"))
    with pytest.raises(EmorecError, match=r"test_sent_emo.csv: line 2 is not valid UTF-8"):
        load_meld(LABELS, data_dir=str(tmp_path / "bad"))


@pytest.mark.skipif(not os.environ.get("EMOREC_DATA_DIR"), reason="real MELD needs EMOREC_DATA_DIR")
def test_real_meld_matches_readme():
    splits = load_meld(LABELS, data_dir=str(Path(os.environ["EMOREC_REAL_DATA_DIR"]) / "meld"))
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [9989, 1109, 2610]
    for examples in (splits.train, splits.dev, splits.test):
        assert {ex.label for ex in examples} == set(range(7))
        assert not any("\u2019" in ex.text or "\x92" in ex.text for ex in examples)
